"""Symbolic straight-line programs and exact differentiation on them.

A network's loss written as one SymPy expression grows quickly with depth,
and ``sympy.diff`` of it (twice in the noise, then in every weight) grows
faster still.  Here the computation is a *program*: a list of assignments
``t_k = expr_k(inputs, t_<k)``, each a small SymPy expression.  Derivatives
are new assignments built by the chain rule, every local partial derivative
taken by ``sympy.diff`` on the (small) right-hand side:

- forward mode ``tangent(t, v) = Σ_p ∂expr_t/∂p · tangent(p, v)``
  (memoised; a node that does not depend on ``v`` has tangent 0);
- reverse mode ``grad(t, wrt)`` accumulates adjoints in reverse order.

Derivative nodes are program nodes too, so derivatives of derivatives need
nothing special.  The result is exact: :meth:`Program.expand` substitutes
every assignment back and gives the single expression (the tests compare it
with ``sympy.diff`` of the expanded loss on small networks).  For numbers,
:meth:`Program.compile` hands the needed assignments to ``sympy.lambdify``
as its common-subexpression list, so the generated Python function is the
program itself.
"""

from __future__ import annotations

import inspect
from typing import Iterable, Sequence

import sympy as sp

__all__ = ["Program", "Compiled"]


class Program:
    """Assignments over a fixed set of input symbols (see module docstring)."""

    def __init__(self, inputs: Iterable[sp.Symbol], prefix: str = "t"):
        self.inputs = list(inputs)
        self._inputs = set(self.inputs)
        self.assigns: list[tuple[sp.Symbol, sp.Expr]] = []
        self.defs: dict[sp.Symbol, sp.Expr] = {}
        self.index: dict[sp.Symbol, int] = {}
        self.deps: dict[sp.Symbol, frozenset] = {}
        self._memo: dict[sp.Expr, sp.Symbol] = {}
        self._tangent: dict[tuple[sp.Symbol, sp.Symbol], sp.Expr] = {}
        self._prefix = prefix

    # ---- building -----------------------------------------------------------
    def add_input(self, sym: sp.Symbol) -> sp.Symbol:
        if sym not in self._inputs:
            self.inputs.append(sym)
            self._inputs.add(sym)
        return sym

    def deps_of(self, expr: sp.Expr) -> frozenset:
        """Input symbols ``expr`` depends on (through the assignments)."""
        out: set = set()
        for p in sp.sympify(expr).free_symbols:
            if p in self._inputs:
                out.add(p)
            elif p in self.deps:
                out |= self.deps[p]
            else:
                raise KeyError(f"symbol {p} is neither an input nor assigned in this program")
        return frozenset(out)

    def let(self, expr, tag: str = "") -> sp.Expr:
        """Assign ``expr`` to a fresh node (atoms and repeats are not re-assigned)."""
        expr = sp.sympify(expr)
        if expr.is_Atom:
            return expr
        hit = self._memo.get(expr)
        if hit is not None:
            return hit
        sym = sp.Symbol(f"_{self._prefix}{len(self.assigns)}{tag}")
        self.deps[sym] = self.deps_of(expr)
        self.index[sym] = len(self.assigns)
        self.assigns.append((sym, expr))
        self.defs[sym] = expr
        self._memo[expr] = sym
        return sym

    # ---- forward mode -------------------------------------------------------
    def diff(self, expr, v: sp.Symbol) -> sp.Expr:
        """Total derivative of ``expr`` (over inputs and nodes) in the input ``v``."""
        expr = sp.sympify(expr)
        terms = []
        for p in expr.free_symbols:
            if p == v:
                dp = sp.Integer(1)
            elif p in self._inputs or v not in self.deps.get(p, ()):
                continue
            else:
                dp = self.tangent(p, v)
            if dp != 0:
                terms.append(sp.diff(expr, p) * dp)
        return sp.Add(*terms)

    def tangent(self, node, v: sp.Symbol) -> sp.Expr:
        """``d node / d v`` as a program node (or 0 / 1 for inputs)."""
        node = sp.sympify(node)
        if node.is_Number:
            return sp.Integer(0)
        if node in self._inputs:
            return sp.Integer(1 if node == v else 0)
        if node not in self.defs:
            return self.let(self.diff(node, v), "d")
        key = (node, v)
        hit = self._tangent.get(key)
        if hit is not None:
            return hit
        if v not in self.deps[node]:
            out = sp.Integer(0)
        else:
            out = self.let(self.diff(self.defs[node], v), "d")
        self._tangent[key] = out
        return out

    # ---- reverse mode -------------------------------------------------------
    def grad(self, node, wrt: Sequence[sp.Symbol]) -> list:
        """``[d node / d w for w in wrt]`` by reverse accumulation (as nodes)."""
        node = self.let(node)
        wrt = list(wrt)
        wset = set(wrt)
        if node in self._inputs:
            return [sp.Integer(1 if w == node else 0) for w in wrt]
        if not isinstance(node, sp.Symbol) or node not in self.defs:
            return [sp.Integer(0)] * len(wrt)
        adj: dict = {node: sp.Integer(1)}
        # every node reachable from `node`, processed in reverse creation order
        reach, stack = set(), [node]
        while stack:
            t = stack.pop()
            for p in self.defs[t].free_symbols:
                if p in self.defs and p not in reach and self.deps[p] & wset:
                    reach.add(p)
                    stack.append(p)
        order = sorted(reach | {node}, key=self.index.__getitem__, reverse=True)
        for t in order:
            a = adj.pop(t, None)
            if a is None or a == 0:
                continue
            a = self.let(a, "a")
            e = self.defs[t]
            for p in e.free_symbols:
                if p in wset or (p in self.defs and self.deps[p] & wset):
                    adj[p] = adj.get(p, sp.Integer(0)) + a * sp.diff(e, p)
        return [self.let(adj.get(w, sp.Integer(0)), "a") for w in wrt]

    # ---- inspection and evaluation -----------------------------------------
    def needed(self, exprs: Iterable) -> list[tuple[sp.Symbol, sp.Expr]]:
        """The assignments ``exprs`` depend on, in program order."""
        need, stack = set(), []
        for e in exprs:
            stack += [p for p in sp.sympify(e).free_symbols if p in self.defs]
        while stack:
            t = stack.pop()
            if t in need:
                continue
            need.add(t)
            stack += [p for p in self.defs[t].free_symbols if p in self.defs and p not in need]
        return [(s, e) for s, e in self.assigns if s in need]

    def expand(self, expr) -> sp.Expr:
        """Back-substitute every assignment: one expression in the inputs."""
        expr = sp.sympify(expr)
        steps = self.needed([expr])
        sub: dict = {}
        for s, e in steps:
            sub[s] = e.xreplace(sub)
        return expr.xreplace(sub)

    def compile(self, args: Sequence, tree) -> "Compiled":
        return Compiled(self, args, tree)


def _flatten(tree):
    """Nested lists of expressions -> (flat list, rebuild function)."""
    if isinstance(tree, (list, tuple)):
        parts = [_flatten(t) for t in tree]
        flat = [x for f, _ in parts for x in f]
        sizes = [len(f) for f, _ in parts]

        def rebuild(values, parts=parts, sizes=sizes):
            out, pos = [], 0
            for (_, rb), n in zip(parts, sizes):
                out.append(rb(values[pos : pos + n]))
                pos += n
            return out

        return flat, rebuild
    return [tree], lambda values: values[0]


class Compiled:
    """``lambdify`` of nested outputs of a :class:`Program`.

    The outputs are flattened; the program's needed assignments are given to
    ``lambdify`` as its ``cse`` list, so the generated source is the
    program (readable with :attr:`source`).
    """

    def __init__(self, program: Program, args, tree):
        flat, self._rebuild = _flatten(tree)
        flat = [sp.sympify(f) for f in flat]
        steps = program.needed(flat)
        self.n_outputs = len(flat)
        self.n_assignments = len(steps)
        self.fn = sp.lambdify(
            args, flat, modules="numpy", cse=lambda exprs: (steps, list(exprs)), docstring_limit=0
        )

    @property
    def source(self) -> str:
        return inspect.getsource(self.fn)

    def __call__(self, *args):
        return self._rebuild(self.fn(*args))
