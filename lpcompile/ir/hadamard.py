"""Orthonormal Hadamard matrices for the dimensions real models have, and the `ai.lpcompile`
Hadamard op that applies one online.

Constructions (no tables are pasted; every matrix is computed):

- Sylvester: H_1 = [1], H_2k = [[H_k, H_k], [H_k, -H_k]] for powers of two.
- Paley I: order q + 1 for a prime power q ≡ 3 (mod 4), from the quadratic character of GF(q).
- Paley II: order 2(q + 1) for a prime power q ≡ 1 (mod 4).
- Kronecker products of the above: H_ab = H_a ⊗ H_b.

`construction(n)` names the factors of order n (odd part first, the Sylvester power of two last,
so that `x · H` on a row viewed as [m, 2^k] is a fast Walsh–Hadamard transform over the
contiguous last axis followed by a small dense m×m transform), e.g. 384 = paley1(12) ⊗
sylvester(32), 1536 = paley1(12) ⊗ sylvester(128), 11008 = paley1(344) ⊗ sylvester(32) (344 = 7³ + 1:
Paley I over GF(343)). Orders with no construction here (e.g. 92, whose Hadamard matrix needs
Williamson's construction) answer None; `largest_block(n)` then finds the largest order that has
one and divides n, for a block-diagonal transform.

The op: `ai.lpcompile::Hadamard(x, a, s)` computes, over the last axis of x, the block-diagonal
product x · diag(H, H, ..., H) with H = a ⊗ s (a: m×m, s: t×t, block b = m·t divides the last
dimension; `kron_factors(b)` gives them: the odd-order Paley part and the Sylvester part). Its ONNX
body is Reshape [..., n/b, m, t] → MatMul s → aᵀ · → Reshape back, so any runtime executes it
with small constants; a backend matches the op and, when (a, s) are a known construction
(`identify(a, s)`), emits a fast Walsh–Hadamard kernel for s instead.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx_ir as ir

from lpcompile.ir import DOMAIN

__all__ = [
    "HADAMARD_OP",
    "construction",
    "has_hadamard",
    "hadamard",
    "block_hadamard",
    "largest_block",
    "random_signs",
    "apply_hadamard",
    "kron_factors",
    "factor_matrices",
    "identify",
    "hadamard_function",
]

HADAMARD_OP = "Hadamard"

Factor = tuple[str, int]  # ("sylvester" | "paley1" | "paley2", order)


# --- finite fields ----------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, else None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); polynomials are coefficient lists, lowest degree first, f monic."""
    a = [c % p for c in a]
    k = len(f) - 1
    for i in range(len(a) - 1, k - 1, -1):
        c = a[i]
        if c:
            for j in range(k + 1):
                a[i - k + j] = (a[i - k + j] - c * f[j]) % p
    return (a + [0] * k)[:k]


def _has_factor_of_degree(f: list[int], d: int, p: int) -> bool:
    for code in range(p**d):
        g = [(code // p**i) % p for i in range(d)] + [1]  # monic of degree d
        if not any(_poly_mod(f, g, p)):
            return True
    return False


@functools.lru_cache(maxsize=None)
def _irreducible(p: int, k: int) -> tuple[int, ...]:
    """The first monic irreducible polynomial of degree k over GF(p) (lowest degree first)."""
    for code in range(p**k):
        f = [(code // p**i) % p for i in range(k)] + [1]
        if f[0] == 0 and k > 1:
            continue  # divisible by x
        if not any(_has_factor_of_degree(f, d, p) for d in range(1, k // 2 + 1)):
            return tuple(f)
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _quadratic_character(p: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """GF(p^k) elements as digit vectors (element index = Σ digit_i p^i) and χ by index."""
    q = p**k
    f = list(_irreducible(p, k))
    digits = np.array([[(e // p**i) % p for i in range(k)] for e in range(q)], dtype=np.int64)
    powers = p ** np.arange(k, dtype=np.int64)
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    for e in range(1, q):
        a = digits[e].tolist()
        sq = [0] * (2 * k - 1)
        for i, ai in enumerate(a):
            for j, aj in enumerate(a):
                sq[i + j] += ai * aj
        chi[int(np.dot(_poly_mod(sq, f, p), powers))] = 1
    return digits, chi


@functools.lru_cache(maxsize=32)
def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = χ(a − b) over GF(q), as int8."""
    p, k = _prime_power(q)  # type: ignore[misc]
    digits, chi = _quadratic_character(p, k)
    powers = p ** np.arange(k, dtype=np.int64)
    diff = ((digits[:, None, :] - digits[None, :, :]) % p) @ powers
    return chi[diff].astype(np.int8)


# --- constructions -----------------------------------------------------------------------------


def _paley_kind(n: int) -> str | None:
    if n % 4:
        return None
    pk = _prime_power(n - 1)
    if pk is not None and (n - 1) % 4 == 3:
        return "paley1"
    pk = _prime_power(n // 2 - 1)
    if pk is not None and (n // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@functools.lru_cache(maxsize=None)
def construction(n: int) -> tuple[Factor, ...] | None:
    """The Kronecker factors of an order-n Hadamard matrix, or None where none is known here.

    Preference: the largest Sylvester (power-of-two) factor, so most of the work is a fast
    Walsh–Hadamard transform; then products of two constructible orders."""
    if n < 1:
        return None
    if _is_power_of_two(n):
        return (("sylvester", n),)
    twos = (n & -n).bit_length() - 1
    odd = n >> twos
    for j in range(2, twos + 1):
        kind = _paley_kind(odd << j)
        if kind is not None:
            rest = n // (odd << j)
            return ((kind, odd << j),) + ((("sylvester", rest),) if rest > 1 else ())
    for a in range(4, math.isqrt(n) + 1):  # products of two non-trivial constructible orders
        if n % a == 0 and (fa := construction(a)) and (fb := construction(n // a)):
            factors = fa + fb
            return tuple(sorted(factors, key=lambda f: f[0] == "sylvester"))
    return None


def has_hadamard(n: int) -> bool:
    return construction(n) is not None


@functools.lru_cache(maxsize=64)
def _factor_matrix(kind: str, n: int) -> np.ndarray:
    """An integer ±1 Hadamard matrix of one factor (H Hᵀ = n I exactly)."""
    if kind == "sylvester":
        h = np.ones((1, 1), dtype=np.int8)
        while h.shape[0] < n:
            h = np.block([[h, h], [h, -h]])
        return h
    if kind == "paley1":  # H = I + S, S = [[0, 1ᵀ], [−1, Q]] skew-symmetric
        q = n - 1
        s = np.zeros((n, n), dtype=np.int8)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return s + np.eye(n, dtype=np.int8)
    if kind == "paley2":  # C = [[0, 1ᵀ], [1, Q]] symmetric conference matrix
        q = n // 2 - 1
        c = np.zeros((q + 1, q + 1), dtype=np.int8)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = _jacobsthal(q)
        a = np.array([[1, -1], [-1, -1]], dtype=np.int8)
        b = np.array([[1, 1], [1, -1]], dtype=np.int8)
        return np.kron(c, a) + np.kron(np.eye(q + 1, dtype=np.int8), b)
    raise ValueError(f"unknown Hadamard construction {kind!r}")


def factor_matrices(n: int) -> list[np.ndarray]:
    """The integer ±1 factors whose Kronecker product (in order) is the order-n matrix."""
    factors = construction(n)
    if factors is None:
        raise ValueError(f"no Hadamard matrix of order {n} is constructible here (try largest_block)")
    return [_factor_matrix(kind, order) for kind, order in factors]


def hadamard(n: int, dtype=np.float64) -> np.ndarray:
    """The orthonormal order-n Hadamard matrix (H Hᵀ = I). ValueError if none is known."""
    h = np.ones((1, 1), dtype=np.float64)
    for f in factor_matrices(n):
        h = np.kron(h, f.astype(np.float64))
    return (h / math.sqrt(n)).astype(dtype)


def block_hadamard(n: int, block: int, dtype=np.float64) -> np.ndarray:
    """diag(H_b, ..., H_b), n × n (b divides n)."""
    if n % block:
        raise ValueError(f"block {block} does not divide {n}")
    return np.kron(np.eye(n // block), hadamard(block)).astype(dtype)


def largest_block(n: int, limit: int | None = None) -> int:
    """The largest b ≤ limit (default n) that divides n and has a Hadamard matrix (≥ 1)."""
    top = n if limit is None else min(n, limit)
    for b in range(top, 0, -1):
        if n % b == 0 and has_hadamard(b):
            return b
    return 1


def random_signs(n: int, rng: np.random.Generator) -> np.ndarray:
    """n random ±1 (float64)."""
    return rng.choice(np.array([-1.0, 1.0]), size=n)


def apply_hadamard(x: np.ndarray, block: int, transpose: bool = False) -> np.ndarray:
    """x · diag(H_b, ...) over the last axis (or x · diag(H_bᵀ, ...)), in O(n log n) for the
    Sylvester factor: the reference for fast kernels and for sizes too large to materialize."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"block {block} does not divide {n}")
    factors = factor_matrices(block)
    y = np.asarray(x, dtype=np.float64).reshape(-1, n // block, *[f.shape[0] for f in factors])
    for axis, f in enumerate(factors, start=2):
        kind = construction(block)[axis - 2][0]  # type: ignore[index]
        if kind == "sylvester":
            y = _fwht(y, axis)
        else:
            m = f.T if transpose else f
            y = np.moveaxis(np.tensordot(y, m.astype(np.float64), axes=([axis], [0])), -1, axis)
    return (y / math.sqrt(block)).reshape(x.shape)


def _fwht(y: np.ndarray, axis: int) -> np.ndarray:
    """Unnormalized Walsh–Hadamard transform along `axis` (Sylvester order, symmetric)."""
    y = np.moveaxis(y, axis, -1).copy()
    n = y.shape[-1]
    h = 1
    while h < n:
        v = y.reshape(*y.shape[:-1], n // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        first = a.copy()  # the butterfly in place: one half-size temporary, not four (a 32000x4096 weight)
        np.add(a, b, out=a)
        np.subtract(first, b, out=b)
        h *= 2
    return np.moveaxis(y, -1, axis)


def kron_factors(block: int, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """(A, S), both orthonormal, with A ⊗ S = hadamard(block): A is the product of the
    non-Sylvester factors and S the Sylvester one; a pure power of two 2^k is split into
    Sylvester 2^⌊k/2⌋ ⊗ 2^⌈k/2⌉. The online op is written with these two small matrices, so
    its constants stay small for large blocks (11008 = 344 · 32: 344² + 32² entries, not 11008²)."""
    factors = construction(block)
    if factors is None:
        raise ValueError(f"no Hadamard matrix of order {block} is constructible here")
    outer = [f for f in factors if f[0] != "sylvester"]
    two = math.prod(order for kind, order in factors if kind == "sylvester")
    if not outer:
        k = two.bit_length() - 1
        m, t = 1 << (k // 2), 1 << (k - k // 2)
        return hadamard(m, dtype), hadamard(t, dtype)
    a = np.ones((1, 1))
    for kind, order in outer:
        a = np.kron(a, _factor_matrix(kind, order).astype(np.float64))
    a /= math.sqrt(a.shape[0])
    return a.astype(dtype), hadamard(two, dtype)


def identify(a: np.ndarray, s: np.ndarray) -> tuple[Factor, ...] | None:
    """The construction of the block a ⊗ s when (a, s) are `kron_factors(b)` (or both
    transposed: reported with ("transpose", b) first), else None. For backends that replace the
    op's dense body by a fast transform."""
    if a.ndim != 2 or s.ndim != 2 or a.shape[0] != a.shape[1] or s.shape[0] != s.shape[1]:
        return None
    b = a.shape[0] * s.shape[0]
    if not has_hadamard(b):
        return None
    ra, rs = kron_factors(b, np.float64)
    if ra.shape != a.shape or rs.shape != s.shape:
        return None
    if np.allclose(a, ra, atol=1e-6) and np.allclose(s, rs, atol=1e-6):
        return construction(b)
    if np.allclose(a, ra.T, atol=1e-6) and np.allclose(s, rs.T, atol=1e-6):
        return (("transpose", b),) + construction(b)  # type: ignore[operator]
    return None


# --- the op ------------------------------------------------------------------------------------


def hadamard_function(model: ir.Model) -> ir.Function:
    """Register (once) and return the model-local function `ai.lpcompile::Hadamard(x, a, s)`:
    y = x · diag(a ⊗ s, a ⊗ s, ...) over the last axis of x (a: m×m, s: t×t, m·t divides the
    last dimension), written with standard ops at the model's own default opset (≥ 15):
    Reshape [..., n/(m·t), m, t] → MatMul s → MatMul aᵀ from the left → Reshape back."""
    key = (DOMAIN, HADAMARD_OP, "")
    if key in model.functions:
        return model.functions[key]
    opset = model.graph.opset_imports.get("", model.opset_imports.get("", 0))
    if opset < 15:
        raise ValueError(f"the Hadamard op needs opset >= 15 of the default domain (model has {opset})")
    x, a, s = ir.Value(name="x"), ir.Value(name="a"), ir.Value(name="s")
    nodes: list[ir.Node] = []

    def add(op, inputs, attrs=None):
        n = ir.node(op, inputs, attrs)
        nodes.append(n)
        return n.outputs[0]

    shape = add("Shape", [x])
    prefix = add("Shape", [x], {"end": -1})
    m = add("Shape", [a], {"start": 0, "end": 1})
    t = add("Shape", [s], {"start": 0, "end": 1})
    minus_one = add("Constant", [], {"value": ir.Tensor(np.array([-1], np.int64), name="minus_one")})
    blocks = add("Reshape", [x, add("Concat", [prefix, minus_one, m, t], {"axis": 0})])
    inner = add("MatMul", [blocks, s])
    outer = add("MatMul", [add("Transpose", [a], {"perm": [1, 0]}), inner])
    y = add("Reshape", [outer, shape])
    graph = ir.Graph([x, a, s], [y], nodes=nodes, opset_imports={"": opset}, name=HADAMARD_OP)
    fn = ir.Function(DOMAIN, HADAMARD_OP, graph=graph, attributes=[])
    model.functions[key] = fn
    model.opset_imports[DOMAIN] = 1
    return fn
