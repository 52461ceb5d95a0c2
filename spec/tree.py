"""Token trees: the topology (``TreeSpec``, ``DynamicTree``), the tree acceptor protocol, SpecInfer's
multi-step speculative sampling and the greedy tree acceptor. ``spec/tree_children.py`` draws the
siblings; ``spec/tree_step.py`` runs trees in the generator.

A pass drafts a tree of tokens after the last committed token; the target scores every node in one
forward (each node attending to itself and its ancestors: ``TreeSpec.ancestors_mask``, at RoPE
offset depth - 1: ``TreeSpec.position_offsets``); a tree acceptor keeps one root-to-node path and
emits one token after it. The protocol::

    acceptor(tree,          # TreeSpec: the topology, shared by all rows of the pass (N nodes)
             node_ids,      # [B, N] int64: node i's token
             node_q,        # [B, N, V] fp32: the draft law node i's token was DRAWN from (i.i.d.
                            #   siblings: every sibling carries q(. | its parent's context))
             target_probs,  # [B, N + 1, V] fp32: p; [:, 0] after the last committed token (the
                            #   root context), [:, i + 1] after node i (context: the path to i)
             rng)           # AcceptorRandomness: ``uniforms`` and ``exponentials`` streams
      -> (path,             # [B, D] int64: node indices of the kept path, root side first, -1 padded
          count,            # [B] int64 in 0..D: the path's length (D = tree.max_depth)
          emitted)          # [B] int64: the token after the path

Attributes, as for chain acceptors: ``name``; ``lossless`` (True / False / None = no claim);
``children_modes``, the sibling samplers the claim holds for ("sample": siblings i.i.d. from
q(. | parent context); "top": the b most likely tokens, deterministic; "distinct": drawn without
replacement); ``exact_when_greedy`` (target-only greedy decoding at temperature 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

CHILDREN_MODES = ("sample", "top", "distinct")


@dataclass(frozen=True)
class TreeSpec:
    """A static token-tree topology: ``parents[i]`` is node i's parent (-1: a child of the last
    committed token). Nodes are in breadth-first order: every parent before its children, depth
    non-decreasing, and the children of one node contiguous."""

    parents: tuple[int, ...]

    def __post_init__(self):
        parents = tuple(int(x) for x in self.parents)
        object.__setattr__(self, "parents", parents)
        if not parents:
            raise ValueError("a token tree needs at least one node (parents is empty)")
        depth: list[int] = []
        for i, parent in enumerate(parents):
            if not -1 <= parent < i:
                raise ValueError(f"node {i}'s parent {parent} does not come before it (parents must precede "
                                 "their children; -1 = the last committed token)")
            if i and parent < parents[i - 1]:
                raise ValueError(f"node {i} (parent {parent}) follows a child of node {parents[i - 1]}: nodes must "
                                 "be in breadth-first order (parents non-decreasing, siblings contiguous)")
            depth.append(1 if parent < 0 else depth[parent] + 1)
        object.__setattr__(self, "_depth", tuple(depth))

    @classmethod
    def from_branching(cls, branching) -> "TreeSpec":
        """b_i children for every node at depth i - 1: [2, 2, 1] -> 2 + 4 + 4 = 10 nodes."""
        branching = list(branching)
        if not branching:
            raise ValueError("branching is empty: give the number of children per level, e.g. [2, 2, 1]")
        if any(int(b) != b or b < 1 for b in branching):
            raise ValueError(f"branching must be positive integers, got {branching}")
        parents: list[int] = []
        level = [-1]  # the nodes of the previous level
        for b in branching:
            nxt = []
            for parent in level:
                for _ in range(int(b)):
                    nxt.append(len(parents))
                    parents.append(parent)
            level = nxt
        return cls(tuple(parents))

    @classmethod
    def chain(cls, g: int) -> "TreeSpec":
        """g nodes in a line: the chain speculative decoding drafts."""
        if g < 1:
            raise ValueError(f"a chain tree needs g >= 1 nodes, got {g}")
        return cls(tuple(range(-1, g - 1)))

    @property
    def n_nodes(self) -> int:
        return len(self.parents)

    @property
    def depth(self) -> tuple[int, ...]:  # [N]: 1 for the root's children
        return self._depth

    @property
    def max_depth(self) -> int:
        return max(self._depth)

    @cached_property
    def _children(self) -> dict[int, tuple[int, ...]]:
        out: dict[int, list[int]] = {i: [] for i in range(-1, self.n_nodes)}
        for i, parent in enumerate(self.parents):
            out[parent].append(i)
        return {k: tuple(v) for k, v in out.items()}

    def children(self, i: int) -> tuple[int, ...]:
        """Node i's children in order (i = -1: the root's)."""
        if not -1 <= i < self.n_nodes:
            raise ValueError(f"node {i} is not in a tree of {self.n_nodes} nodes")
        return self._children[i]

    def ancestors_mask(self) -> torch.Tensor:  # [N, N] bool
        """[i, j]: node i sees node j (j is i or an ancestor of i): the target's attention mask
        among the tree's slots (each sees the committed prefix too)."""
        N = self.n_nodes
        mask = torch.eye(N, dtype=torch.bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                mask[i] |= mask[parent]  # BFS order: the parent's row is complete
        return mask

    def position_offsets(self) -> torch.Tensor:  # [N] int64
        """RoPE position of node i minus that of the first token after the committed prefix:
        depth - 1 (not its slot index: docs/exactness.md pitfall 9)."""
        return torch.tensor(self._depth, dtype=torch.long) - 1

    def truncated(self, max_depth: int, max_nodes: int) -> "TreeSpec | None":
        """The first nodes (breadth-first) of depth <= max_depth, at most max_nodes of them: a
        tree again (a breadth-first prefix holds every kept node's ancestors); None if empty."""
        keep = 0
        while keep < min(self.n_nodes, max_nodes) and self._depth[keep] <= max_depth:
            keep += 1
        if keep == self.n_nodes:
            return self
        return TreeSpec(self.parents[:keep]) if keep else None

    @property
    def branching(self) -> list[int] | None:
        """[b_1, .., b_d] if every node at depth i - 1 has b_i children (a static tree), else None."""
        out = []
        level = [-1]
        while True:
            counts = {len(self.children(u)) for u in level}
            if len(counts) != 1:
                return None
            b = counts.pop()
            if b == 0:
                return out
            out.append(b)
            level = [c for u in level for c in self.children(u)]

    def __str__(self) -> str:
        b = self.branching
        return "[" + ",".join(map(str, b)) + "]" if b is not None else f"tree({self.n_nodes} nodes)"


@dataclass(frozen=True)
class DynamicTree:
    """``tree="dynamic:N"``: N nodes per row, grown each pass where the draft's path probability is
    highest (EAGLE-2): every level expands the ``width`` likeliest nodes of the last level, each
    into its ``width`` likeliest children, up to ``max_depth`` levels; the N likeliest candidates
    (by the product of q along their path) form the row's tree. Its shape depends on q, so its
    children must be deterministic ("top"): a shape chosen from sampled tokens would bias them."""

    n_nodes: int
    max_depth: int
    width: int = 4

    def __post_init__(self):
        for name in ("n_nodes", "max_depth", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"dynamic tree: {name} must be a positive integer, got {v!r}")

    def __str__(self) -> str:
        return f"dynamic:{self.n_nodes}"


def parse_tree(tree, max_depth: int | None = None):
    """``tree=`` -> a TreeSpec (a branching list [b1, .., bd], "b1,b2,..", or a TreeSpec) or a
    DynamicTree ("dynamic:N"; depth ``max_depth``)."""
    if isinstance(tree, (TreeSpec, DynamicTree)):
        return tree
    if isinstance(tree, str):
        if tree.startswith("dynamic:"):
            n = tree[len("dynamic:"):]
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"tree {tree!r}: expected dynamic:N with N a positive number of nodes")
            return DynamicTree(int(n), max_depth or min(int(n), 5))
        try:
            tree = [int(x) for x in tree.strip("[] ").split(",")]
        except ValueError:
            raise ValueError(f"tree {tree!r}: expected a branching such as '2,2,1', a list, 'dynamic:N' or a "
                             "TreeSpec") from None
    if isinstance(tree, (list, tuple)):
        return TreeSpec.from_branching(tree)
    raise TypeError(f"tree must be a branching list such as [2, 2, 1], 'dynamic:N' or a TreeSpec, got "
                    f"{type(tree).__name__}")


def check_tree_inputs(tree: TreeSpec, node_ids, node_q, target_probs) -> tuple[int, int, int]:
    """Check the tree acceptor contract's shapes; return (B, N, V)."""
    N = tree.n_nodes
    B = node_ids.shape[0]
    V = target_probs.shape[-1]
    if node_ids.shape != (B, N) or node_q.shape != (B, N, V) or target_probs.shape != (B, N + 1, V):
        raise ValueError(f"shape mismatch for a tree of {N} nodes: node_ids {tuple(node_ids.shape)}, node_q "
                         f"{tuple(node_q.shape)}, target_probs {tuple(target_probs.shape)} (expected [B, N], "
                         "[B, N, V], [B, N + 1, V])")
    return B, N, V


def _empty_path(B: int, D: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((B, D), -1, dtype=torch.long, device=device), torch.zeros(B, dtype=torch.long, device=device)


def accept_tree_by_ids(tree: TreeSpec, node_ids: torch.Tensor,  # [B, N] int64
                       choice: torch.Tensor,  # [B, N + 1] int64: the target's argmax at each context
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # path [B, D], count [B], emitted [B]
    """Temperature 0: from the root, move to the first child whose token equals ``choice`` at the
    current context; where none does (or at a leaf), emit ``choice`` there. This is what
    multi-step speculative sampling decides on one-hot p and q."""
    B = node_ids.shape[0]
    device = node_ids.device
    path, count = _empty_path(B, tree.max_depth, device)
    rows = torch.arange(B, device=device)
    cur = torch.full((B,), -1, dtype=torch.long, device=device)
    for u in range(-1, tree.n_nodes):  # BFS order: a row that moves to a child meets it later
        moved = torch.zeros(B, dtype=torch.bool, device=device)
        for c in tree.children(u):
            hit = (cur == u) & ~moved & (node_ids[:, c] == choice[:, u + 1])
            slot = count.clamp(max=tree.max_depth - 1)
            path[rows, slot] = torch.where(hit, c, path[rows, slot])
            count = count + hit.long()
            moved |= hit
            cur = torch.where(hit, c, cur)
    emitted = choice.gather(1, (cur + 1)[:, None])[:, 0].long()
    return path, count, emitted


def sibling_residual(residual: torch.Tensor,  # [B, V] unnormalised residual law r at the context
                     mass: torch.Tensor,  # [B] its mass (1 for p itself)
                     q: torch.Tensor,  # [B, V] the law the rejected sibling was drawn from
                     ) -> torch.Tensor:  # [B, V] unnormalised max(0, r / mass - q) * mass
    """The residual after a rejected sibling: normalize(max(0, r - q)), kept unnormalised."""
    return (residual - mass[:, None] * q).clamp(min=0)


def multistep_accept(
    tree: TreeSpec,
    node_ids: torch.Tensor,  # [B, N] int64
    node_q: torch.Tensor,  # [B, N, V] fp32: the law each node's token was drawn from
    target_probs: torch.Tensor,  # [B, N + 1, V] fp32
    uniforms: torch.Tensor,  # [B, N] in [0, 1): node i's accept test
    exponentials: torch.Tensor,  # [B, V] > 0: Exp(1) race for the emitted token
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # path [B, D], count [B], emitted [B]
    """Multi-step speculative sampling (SpecInfer, Miao et al., arXiv 2305.09781, Algorithm 2,
    VerifyStochastic) with explicit random numbers.

    At context u with residual r (at first r = p(. | u)), the children c_1, c_2, .. of u are tried
    in order: c_j (token x_j, drawn from q_j = node_q[c_j]) is accepted iff
    ``uniforms[c_j] * q_j(x_j) * mass(r) < r(x_j)``, i.e. with probability min(1, r(x_j) / q_j(x_j))
    for the normalised r (q_j(x_j) = 0: accepted iff r(x_j) > 0); then the pass moves to c_j with
    r = p(. | c_j). After a rejection r <- normalize(max(0, r - q_j)) and the next child is tried.
    When no child is accepted (or u is a leaf) one token is drawn from r: ``argmax_v r_v / e_v``.
    An empty residual (sum 0) needs r = q_j, where a rejection has probability 0: only rounding
    gets there, and then r falls back to p(. | u). Arithmetic in fp32 (fp64 if an input is)."""
    B, N, V = check_tree_inputs(tree, node_ids, node_q, target_probs)
    if uniforms.shape != (B, N) or exponentials.shape != (B, V):
        raise ValueError(f"uniforms must be [B, N] and exponentials [B, V]; got {tuple(uniforms.shape)}, "
                         f"{tuple(exponentials.shape)}")
    dtype = torch.float64 if torch.float64 in (node_q.dtype, target_probs.dtype) else torch.float32
    p = target_probs.to(dtype)
    q = node_q.to(dtype)
    u_all = uniforms.to(dtype)
    device = p.device
    ids = node_ids.long()
    rows = torch.arange(B, device=device)
    D = tree.max_depth
    path, count = _empty_path(B, D, device)
    cur = torch.full((B,), -1, dtype=torch.long, device=device)  # the row's current context node
    residual = p[:, 0].clone()  # [B, V] r at the current context, unnormalised
    mass = torch.ones(B, dtype=dtype, device=device)  # [B] its mass (p counts as 1, as rejection_sample)
    for u in range(-1, N):  # BFS order: a row that moves to a child meets it later in this loop
        here = cur == u  # [B] rows deciding at context u (rows that moved on are no longer here)
        moved = torch.zeros(B, dtype=torch.bool, device=device)
        for c in tree.children(u):
            trying = here & ~moved
            x = ids[:, c:c + 1]  # [B, 1]
            q_c = q[:, c]  # [B, V]
            ok = trying & (u_all[:, c] * q_c.gather(1, x)[:, 0] * mass < residual.gather(1, x)[:, 0])
            slot = count.clamp(max=D - 1)
            path[rows, slot] = torch.where(ok, c, path[rows, slot])
            count = count + ok.long()
            moved |= ok
            cur = torch.where(ok, c, cur)
            rejected = trying & ~ok
            r_new = sibling_residual(residual, mass, q_c)
            m_new = r_new.sum(-1)
            empty = m_new <= 0  # unreachable in exact arithmetic: back to p(. | u)
            r_new = torch.where(empty[:, None], p[:, u + 1], r_new)
            m_new = torch.where(empty, torch.ones_like(m_new), m_new)
            residual = torch.where(ok[:, None], p[:, c + 1], torch.where(rejected[:, None], r_new, residual))
            mass = torch.where(ok, torch.ones_like(mass), torch.where(rejected, m_new, mass))
    emitted = torch.argmax(residual / exponentials.to(dtype), dim=-1)  # [B]; lowest id on ties
    return path, count, emitted


class TreeAcceptorBase:
    """Defaults of a tree acceptor's optional members: no exactness claim, no greedy shortcut."""

    lossless: bool | None = None
    children_modes: tuple[str, ...] = ()
    exact_when_greedy = False
    accepts_greedy_ids = False  # opt in only if accept_greedy decides as __call__ does at temperature 0
    # the chain acceptor that is this rule on a chain (one child per node), or None: tree="auto"
    # then runs the chains it picks through the chain step (drafted one token a forward)
    chain_acceptor: str | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(self, tree, node_ids, node_q, target_probs, rng):
        raise NotImplementedError(f"{type(self).__name__} must define __call__(tree, node_ids, node_q, target_probs, rng)")

    def accept_greedy(self, tree, node_ids, choice):
        """Temperature 0 from the target's argmax ids ``choice`` [B, N + 1]: accept_tree_by_ids."""
        return accept_tree_by_ids(tree, node_ids, choice)


class MultistepTreeAcceptor(TreeAcceptorBase):
    """SpecInfer's multi-step speculative sampling (:func:`multistep_accept`): exact when each
    sibling's ``node_q`` is the law it was drawn from: i.i.d. from q(. | parent context)
    ("sample"); without replacement, q with the earlier siblings' tokens removed ("distinct", where
    the rule is Jeon et al.'s recursive rejection sampling); the b likeliest tokens with one-hot
    q ("top"). All three pass ``check_tree_exactness``; testing every sibling against q(. | parent)
    when they were drawn otherwise is what breaks it (docs/exactness.md pitfall 7).

    Random numbers: N uniforms per row (``rng.uniforms``; a fresh one for every sibling test) and
    V exponentials per row (``rng.exponentials``; the emitted token). At temperature 0 (one-hot p
    and q) its decisions are those of :func:`accept_tree_by_ids`."""

    name = "multistep"
    chain_acceptor = "default"  # one child per node: token-wise rejection sampling
    lossless = True
    children_modes = ("sample", "distinct", "top")
    exact_when_greedy = True

    @property
    def accepts_greedy_ids(self) -> bool:
        return type(self) is MultistepTreeAcceptor  # a subclass may change the rule; it opts in itself

    def __call__(self, tree, node_ids, node_q, target_probs, rng):
        B, N, V = check_tree_inputs(tree, node_ids, node_q, target_probs)
        uniforms = rng.uniforms(B, N)  # [B, N] accept stream: one per node
        exponentials = rng.exponentials(B, V)  # [B, V] race stream
        return multistep_accept(tree, node_ids, node_q, target_probs, uniforms, exponentials)


class GreedyTreeAcceptor(TreeAcceptorBase):
    """Follow the children that equal the target's argmax, emit the argmax after them. The output
    is the target's greedy decode whatever the temperature: exact at temperature 0 only, for any
    sibling sampler."""

    name = "greedy"
    chain_acceptor = "default"  # at temperature 0 the chain step decides from the same argmax ids
    lossless = False
    children_modes = CHILDREN_MODES
    exact_when_greedy = True

    @property
    def accepts_greedy_ids(self) -> bool:
        return type(self) is GreedyTreeAcceptor

    def __call__(self, tree, node_ids, node_q, target_probs, rng):
        check_tree_inputs(tree, node_ids, node_q, target_probs)
        return accept_tree_by_ids(tree, node_ids, target_probs.argmax(-1))  # lowest id on ties


TREE_ACCEPTORS = {"multistep": MultistepTreeAcceptor, "greedy": GreedyTreeAcceptor}
