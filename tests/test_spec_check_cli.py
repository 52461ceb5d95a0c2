"""``verispec check``: the exactness checker from the command line, on built-in and custom parts."""

import json

import pytest

from spec_helpers import CountingAcceptor
from verispec.cli import main


def test_check_passes_for_the_default_acceptor(capsys):
    assert main(["check", "--k", "3", "--samples", "20000", "--length", "3", "--vocab", "5", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "acceptor default" in out


def test_check_fails_for_the_biased_pairing(capsys):
    assert main(["check", "--draft", "argmax-softq", "--samples", "20000", "--length", "3", "--vocab", "5"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_runs_a_custom_acceptor_by_import_string(capsys):
    before = CountingAcceptor.calls
    code = main(["check", "--acceptor", "spec_helpers:CountingAcceptor", "--draft", "ngram", "--k", "4",
                 "--samples", "20000", "--length", "3", "--vocab", "4", "--order", "2", "--prompt", "1,2",
                 "--prompt", "3", "--eos", "0", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["verdict"] == "PASS"
    assert CountingAcceptor.calls > before
    assert [g["prompt"] for g in report["groups"]] == [[1, 2], [3]]


def test_check_reports_bad_input(capsys):
    assert main(["check", "--acceptor", "nope"]) == 1
    assert "unknown acceptor" in capsys.readouterr().err


def test_check_tree_passes_for_multistep_with_iid_children(capsys):
    assert main(["check", "--tree", "2,2", "--acceptor", "multistep", "--samples", "40000", "--vocab", "4"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "tree acceptor multistep" in out and "children=sample" in out


def test_check_tree_fails_for_the_iid_rule_on_distinct_children(capsys):
    """Pitfall 7 by import string: siblings without replacement tested against q(. | parent)."""
    code = main(["check", "--tree", "3,1", "--children", "distinct", "--acceptor", "test_spec_tree:ParentLawAcceptor",
                 "--samples", "40000", "--vocab", "4", "--seed", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["verdict"] == "FAIL" and report["config"]["children"] == "distinct"
    assert report["config"]["tree"] == [-1, -1, -1, 0, 1, 2]


def test_check_tree_greedy_passes_at_temperature_0_and_fails_above(capsys):
    assert main(["check", "--tree", "2,2", "--children", "top", "--acceptor", "greedy", "--temperature", "0",
                 "--samples", "2000"]) == 0
    assert main(["check", "--tree", "2,2", "--acceptor", "greedy", "--samples", "20000"]) == 1
    assert capsys.readouterr().out.count("FAIL") == 1


def test_check_tree_reports_a_bad_tree_in_one_line(capsys):
    assert main(["check", "--tree", "2,x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--tree" in err and "2,x" in err and len(err.splitlines()) == 1
    assert main(["check", "--tree", "2,0"]) == 1
    assert "positive" in capsys.readouterr().err


@pytest.mark.parametrize("tree,children,acceptor", [("2,2", "sample", "traversal"), ("3,1", "distinct", "recursive"),
                                                    ("dynamic:5", "top", "default"), ("auto", "sample", "default")])
def test_check_tree_loop_runs_the_generator_with_trees(capsys, tree, children, acceptor):
    code = main(["check", "--tree", tree, "--loop", "--children", children, "--acceptor", acceptor, "--order", "2",
                 "--samples", "20000", "--vocab", "4", "--length", "3", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["verdict"] == "PASS", report
    assert report["speculation"]["tree"] and report["config"]["children"] == children


def test_check_tree_loop_fails_a_biased_tree_acceptor(capsys):
    code = main(["check", "--tree", "3,1", "--loop", "--children", "distinct", "--acceptor",
                 "test_spec_tree:ParentLawAcceptor", "--samples", "40000", "--vocab", "4", "--length", "2",
                 "--json"])
    assert code == 1 and json.loads(capsys.readouterr().out)["verdict"] == "FAIL"
