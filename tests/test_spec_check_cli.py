"""``verispec check``: the exactness checker from the command line, on built-in and custom parts."""

import json

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
