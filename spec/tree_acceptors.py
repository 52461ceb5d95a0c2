"""Two more tree acceptors (protocol: spec/tree.py): recursive rejection sampling without replacement
and traversal verification. Registered in ``TREE_ACCEPTORS`` as "recursive" and "traversal".

Recursive rejection sampling (Jeon, Gagrani, Goel, Park, Lee, Lott, "Recursive Speculative Decoding:
Accelerating LLM Inference via Sampling Without Replacement"): siblings are drawn WITHOUT replacement
from q = q(. | parent context); sibling j's law is q with the tokens of siblings 1..j-1 removed and
renormalised. :class:`RecursiveTreeAcceptor` takes the first sibling's ``node_q`` as q and computes
every later sibling's law itself (it does not trust their ``node_q``), then runs multi-step
speculative sampling with those laws (residual r <- normalize(max(0, r - q_j)) after a rejection).

Traversal verification (Weng, Hu, Chen, Liu, Mei, Qiu, Tian, Shi, "Traversal Verification for
Speculative Tree Decoding", NeurIPS 2025): the tree is tested bottom-up, in post-order (a node after
all its children's subtrees, the subtree of child 1 before that of child 2), with sequence-level
weights; on a chain it is block verification (Sun et al., spec/block.py). See
:func:`traversal_accept` and docs/exactness.md, "Tree acceptors: recursive and traversal".
"""

from __future__ import annotations

import torch

from .tree import (TREE_ACCEPTORS, TreeAcceptorBase, _empty_path, check_tree_inputs, multistep_accept)


def _dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is fp64 (as multistep_accept)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ---- recursive rejection sampling without replacement ---------------------------------------------------


def without_replacement_law(q: torch.Tensor,  # [B, V] the first sibling's law q(. | parent context)
                            removed: torch.Tensor,  # [B, V] bool: the earlier siblings' tokens
                            ) -> torch.Tensor:  # [B, V]: normalize(q without them); all zeros if none is left
    """The law of a sibling drawn after ``removed`` (sequential sampling without replacement)."""
    law = q.masked_fill(removed, 0.0)
    mass = law.sum(-1, keepdim=True)
    return torch.where(mass > 0, law / torch.where(mass > 0, mass, torch.ones_like(mass)), torch.zeros_like(law))


class RecursiveTreeAcceptor(TreeAcceptorBase):
    """Recursive rejection sampling for siblings drawn without replacement ("distinct").

    At every node u with children c_1..c_b (tokens x_1..x_b), q = ``node_q[c_1]`` is taken as
    q(. | u) and sibling j >= 2 is tested against q_j = normalize(q with x_1..x_{j-1} removed), the
    law it was drawn from, whatever ``node_q[c_j]`` says; then :func:`multistep_accept` decides
    (accept x_j with probability min(1, r(x_j) / q_j(x_j)), r <- normalize(max(0, r - q_j)) after
    a rejection, one token from r where no child is accepted). With honest ``node_q`` this is
    exactly ``multistep``.

    Support exhausted: where q has fewer nonzero tokens than u has children, q_j is empty (zero
    mass) for the surplus siblings; the drafting side then drafts the likeliest not-yet-drawn token
    with a one-hot law, and that law is what ``node_q[c_j]`` carries, so q_j = ``node_q[c_j]`` there.
    Each stage is a valid speculative-sampling stage for its sibling's honest law, so the rule stays
    exact.

    Random numbers: as ``multistep``, N uniforms and V exponentials per row. At temperature 0
    (one-hot p and q) its decisions are those of :func:`accept_tree_by_ids`: q is one-hot, so every
    later sibling's renormalised law is empty and its one-hot ``node_q`` is used."""

    name = "recursive"
    chain_acceptor = "default"  # one draft per position: token-wise rejection sampling
    lossless = True
    children_modes = ("distinct",)
    exact_when_greedy = True

    @property
    def accepts_greedy_ids(self) -> bool:
        return type(self) is RecursiveTreeAcceptor  # a subclass may change the rule; it opts in itself

    def sibling_law(self, q: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
        """[B, V]: the law of a sibling drawn after the ``removed`` tokens (zeros: support exhausted)."""
        return without_replacement_law(q, removed)

    def sibling_laws(self, tree, node_ids, node_q) -> torch.Tensor:  # [B, N, V]
        """``node_q`` with every later sibling's law recomputed from its first sibling's."""
        B, N, V = node_q.shape
        laws = node_q.to(_dtype(node_q)).clone()
        ids = node_ids.long()
        for u in range(-1, N):
            ch = tree.children(u)
            if len(ch) < 2:
                continue
            q = laws[:, ch[0]]  # [B, V]
            removed = torch.zeros(B, V, dtype=torch.bool, device=node_q.device)
            for prev, c in zip(ch[:-1], ch[1:]):
                removed = removed.scatter(1, ids[:, prev:prev + 1], True)
                law = self.sibling_law(q, removed)
                exhausted = law.sum(-1) <= 0  # [B]: q has no token left; the draft's one-hot law holds
                laws[:, c] = torch.where(exhausted[:, None], laws[:, c], law)
        return laws

    def __call__(self, tree, node_ids, node_q, target_probs, rng):
        B, N, V = check_tree_inputs(tree, node_ids, node_q, target_probs)
        uniforms = rng.uniforms(B, N)  # [B, N] accept stream: one per node
        exponentials = rng.exponentials(B, V)  # [B, V] race stream
        laws = self.sibling_laws(tree, node_ids, node_q)
        if target_probs.dtype == torch.float64:
            laws = laws.double()
        return multistep_accept(tree, node_ids, laws, target_probs, uniforms, exponentials)


# ---- traversal verification -------------------------------------------------------------------------------


def child_weight(alpha: torch.Tensor,  # [B] the parent's weight
                 residual: torch.Tensor,  # [B, V] the parent's residual law r, unnormalised
                 mass: torch.Tensor,  # [B] its mass
                 q: torch.Tensor,  # [B, V] the law the child's token was drawn from
                 x: torch.Tensor,  # [B, 1] the child's token
                 ) -> torch.Tensor:  # [B]: min(1, alpha r(x) / (mass q(x)))
    """A child's sequence-level weight min(1, alpha rho(x) / q(x)), rho = r / mass; q(x) = 0 gives 1
    iff alpha rho(x) > 0 (as block verification and ``rejection_sample``)."""
    num = alpha * residual.gather(1, x)[:, 0] / mass  # [B] alpha rho(x)
    q_x = q.gather(1, x)[:, 0]
    ratio = num / torch.where(q_x > 0, q_x, torch.ones_like(q_x))
    return torch.where(num >= q_x, (num > 0).to(num.dtype), ratio)


def traversal_residual(alpha: torch.Tensor,  # [B] the parent's weight
                       residual: torch.Tensor,  # [B, V] its residual r, unnormalised
                       mass: torch.Tensor,  # [B] the mass of r
                       q: torch.Tensor,  # [B, V] the law the deleted child was drawn from
                       fallback: torch.Tensor,  # [B, V] p(. | parent context)
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # alpha', r', mass'
    """The parent's state after a child's whole subtree is deleted: with rho = r / mass,
    r' = max(0, alpha rho - q) (kept as mass * that), R = sum r' / mass, and
    alpha' = R / (R + 1 - alpha) = sum max(0, alpha rho - q) / sum max(0, q - alpha rho).
    R = 0 (alpha rho = q: a deletion of probability 0, reached by rounding only) gives alpha' = 0
    and r' = p(. | parent), never NaN."""
    r_new = (alpha[:, None] * residual - mass[:, None] * q).clamp(min=0)  # mass * max(0, alpha rho - q)
    m_new = r_new.sum(-1)
    empty = m_new <= 0
    big_r = m_new / mass  # [B] R
    denom = big_r + (1 - alpha)  # sum max(0, q - alpha rho): > 0 where R > 0
    a_new = torch.where(empty, torch.zeros_like(alpha), big_r / torch.where(empty, torch.ones_like(denom), denom))
    r_new = torch.where(empty[:, None], fallback, r_new)
    m_new = torch.where(empty, torch.ones_like(m_new), m_new)
    return a_new.clamp(0, 1), r_new, m_new


def traversal_accept(
    tree,
    node_ids: torch.Tensor,  # [B, N] int64
    node_q: torch.Tensor,  # [B, N, V] fp32: the law each node's token was drawn from
    target_probs: torch.Tensor,  # [B, N + 1, V] fp32
    uniforms: torch.Tensor,  # [B, N] in [0, 1): node i's stop test
    exponentials: torch.Tensor,  # [B, V] > 0: Exp(1) race for the emitted token
    *,
    return_stops: bool = False,
):
    """Traversal verification with explicit random numbers -> (path [B, D], count [B], emitted [B])
    (and, with ``return_stops``, stops [B, N]: node i's test probability, below).

    Every node carries a weight alpha, a residual law r (at first p(. | node), mass 1) and is
    tested once, in post-order (children before their parent, child 1's subtree before child 2's):

    - when the traversal enters node c (child of u) its weight is alpha_c = min(1, alpha_u
      rho_u(x_c) / q_c(x_c)) from u's state at that moment (rho = r / mass; the root has alpha = 1,
      r = p(. | root)): the sequence-level ratio p(path) / q(path), capped at 1 as it accumulates;
    - after all c's children are deleted, c is tested: accepted iff ``uniforms[c] < alpha_c``;
      then the path root..c is kept and one token is drawn from r_c (``argmax r_c / e``);
    - otherwise c (with its subtree) is deleted and u's state is updated with c's law q_c
      (:func:`traversal_residual`): r_u <- max(0, alpha_u rho_u - q_c), alpha_u <- R / (R + 1 -
      alpha_u); the traversal goes on with u's next child, or tests u when none is left;
    - the root is never tested (its alpha stays 1): a row that deletes all of its children keeps
      the empty path and draws from the root's residual.

    A row that is still running when node i is tested has rejected every node before i in post-order,
    so its state there is a function of the drafts alone: ``stops[:, i]`` is that test probability
    (P(accept at i) = stops[i] * prod over earlier nodes j of (1 - stops[j])). On a chain this is
    block verification, decision for decision on the same uniforms (node i's test is block's u_{i+1})."""
    B, N, V = check_tree_inputs(tree, node_ids, node_q, target_probs)
    if uniforms.shape != (B, N) or exponentials.shape != (B, V):
        raise ValueError(f"uniforms must be [B, N] and exponentials [B, V]; got {tuple(uniforms.shape)}, "
                         f"{tuple(exponentials.shape)}")
    dtype = _dtype(node_q, target_probs)
    p = target_probs.to(dtype)
    q = node_q.to(dtype)
    u_all = uniforms.to(dtype)
    e = exponentials.to(dtype)
    device = p.device
    ids = node_ids.long()
    D = tree.max_depth
    stops = torch.zeros(B, N, dtype=dtype, device=device)
    accepted = torch.full((B,), -1, dtype=torch.long, device=device)  # the node kept last (-1: the root)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    emitted = torch.zeros(B, dtype=torch.long, device=device)
    ones = torch.ones(B, dtype=dtype, device=device)

    def delete_child(state, c, u):  # the parent's state after child c's subtree is deleted
        alpha, r, m = state
        return list(traversal_residual(alpha, r, m, q[:, c], p[:, u + 1]))

    def visit(c, parent_state, u):
        nonlocal accepted, done, emitted
        alpha_u, r_u, m_u = parent_state
        state = [child_weight(alpha_u, r_u, m_u, q[:, c], ids[:, c:c + 1]).clamp(0, 1), p[:, c + 1], ones]
        for child in tree.children(c):
            visit(child, state, c)
        alpha_c, r_c, _ = state
        stops[:, c] = alpha_c
        ok = ~done & (u_all[:, c] < alpha_c)
        accepted = torch.where(ok, c, accepted)
        emitted = torch.where(ok, torch.argmax(r_c / e, dim=-1), emitted)
        done = done | ok
        parent_state[:] = delete_child(parent_state, c, u)

    root = [torch.ones(B, dtype=dtype, device=device), p[:, 0], ones]
    for c in tree.children(-1):
        visit(c, root, -1)
        root[0] = torch.ones(B, dtype=dtype, device=device)  # 1 in exact arithmetic: R / (R + 1 - 1)
        # an empty root residual (rounding only) fell back to p(. | root) in traversal_residual
    emitted = torch.where(done, emitted, torch.argmax(root[1] / e, dim=-1))  # lowest id on ties
    path, count = _empty_path(B, D, device)
    depth = torch.tensor((0,) + tree.depth, dtype=torch.long, device=device)
    count = depth[accepted + 1]
    parents = torch.tensor(tree.parents, dtype=torch.long, device=device)
    node = accepted
    rows = torch.arange(B, device=device)
    for d in range(D, 0, -1):  # walk up from the kept node, filling the path from its end
        here = count >= d
        path[rows, (d - 1)] = torch.where(here, node, path[rows, d - 1])
        node = torch.where(here, parents[node.clamp(min=0)], node)
    return (path, count, emitted, stops) if return_stops else (path, count, emitted)


class TraversalTreeAcceptor(TreeAcceptorBase):
    """Traversal verification (Weng et al., NeurIPS 2025): bottom-up, sequence-level tree
    verification (:func:`traversal_accept`). Exact when each sibling's ``node_q`` is the law it was
    drawn from given the earlier siblings: i.i.d. ("sample"), without replacement ("distinct") and
    top-b with one-hot laws ("top") all pass ``check_tree_exactness`` (docs/exactness.md). On a
    chain it is block verification, so it keeps at least as many tokens in expectation as
    ``multistep`` there.

    Random numbers: as ``multistep``, N uniforms per row (node i's test) and V exponentials per row
    (the emitted token). At temperature 0 (one-hot p and q) every weight is 0 or 1 and its decisions
    are those of :func:`accept_tree_by_ids`."""

    name = "traversal"
    chain_acceptor = "block"  # on a chain traversal verification is block verification
    lossless = True
    children_modes = ("sample", "distinct", "top")
    exact_when_greedy = True

    @property
    def accepts_greedy_ids(self) -> bool:
        return type(self) is TraversalTreeAcceptor  # a subclass may change the rule; it opts in itself

    def __call__(self, tree, node_ids, node_q, target_probs, rng):
        B, N, V = check_tree_inputs(tree, node_ids, node_q, target_probs)
        uniforms = rng.uniforms(B, N)  # [B, N] stop tests: one per node
        exponentials = rng.exponentials(B, V)  # [B, V] race stream
        return traversal_accept(tree, node_ids, node_q, target_probs, uniforms, exponentials)


TREE_ACCEPTORS.update(recursive=RecursiveTreeAcceptor, traversal=TraversalTreeAcceptor)
