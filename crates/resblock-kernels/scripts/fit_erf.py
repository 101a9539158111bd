"""Fits the rational erf approximation of `src/dense/gelu.rs` and checks it in float32.

erf(x) ~ x * P(x^2) / Q(x^2) for |x| <= CLAMP (erf rounds to +-1 in float32 beyond),
P and Q of degree 5 with Q(0) = 1: Sanathanan-Koerner iterations for the rational
least-squares fit, then Lawson reweighting towards the minimax error. Prints the
coefficients (paste them into gelu.rs) and the largest absolute error of the float32
evaluation (Horner, as the Rust code does) over [-6, 6].

Run: python3 crates/resblock-kernels/scripts/fit_erf.py  (numpy only)
"""

from math import erf

import numpy as np

CLAMP = 3.92
DEG_P, DEG_Q = 5, 5

verf = np.vectorize(erf)


def rational_fit(t, x, f, weights):
    """Least squares of x * P(t) - f * Q(t) with Q(0) = 1, rows weighted."""
    a = np.hstack(
        [
            x[:, None] * np.vander(t, DEG_P + 1, increasing=True),
            -f[:, None] * np.vander(t, DEG_Q + 1, increasing=True)[:, 1:],
        ]
    )
    sol, *_ = np.linalg.lstsq(a * weights[:, None], f * weights, rcond=None)
    return sol[: DEG_P + 1], np.concatenate([[1.0], sol[DEG_P + 1 :]])


def fit():
    t = (np.cos(np.linspace(0, np.pi, 6000)) * 0.5 + 0.5) * CLAMP * CLAMP
    x = np.sqrt(t)
    f = verf(x)
    q_prev = np.ones_like(t)
    for _ in range(30):  # Sanathanan-Koerner: divide out the previous denominator
        p, q = rational_fit(t, x, f, 1 / np.abs(q_prev))
        q_prev = np.polyval(q[::-1], t)
    lawson = np.ones_like(t)
    for _ in range(60):  # Lawson: weight towards the points of largest error
        q_t = np.polyval(q[::-1], t)
        p, q = rational_fit(t, x, f, np.sqrt(lawson) / np.abs(q_t))
        err = np.abs(x * np.polyval(p[::-1], t) / np.polyval(q[::-1], t) - f)
        lawson = lawson * err
        lawson /= lawson.sum()
    return p, q


def eval_f32(p, q, xs):
    a = np.minimum(np.abs(xs), np.float32(CLAMP)).astype(np.float32)
    t = a * a
    pp, qq = np.float32(p[-1]), np.float32(q[-1])
    for c in p[-2::-1]:
        pp = (pp * t + np.float32(c)).astype(np.float32)
    for c in q[-2::-1]:
        qq = (qq * t + np.float32(c)).astype(np.float32)
    return np.sign(xs) * np.minimum(a * pp / qq, np.float32(1))


if __name__ == "__main__":
    p, q = fit()
    xs = np.linspace(-6, 6, 400001).astype(np.float32)
    err = np.abs(eval_f32(p, q, xs) - verf(xs.astype(np.float64)))
    print("P:", ", ".join(f"{c:.9e}" for c in p))
    print("Q:", ", ".join(f"{c:.9e}" for c in q))
    print(f"max |error| in float32: {err.max():.3g} at x = {xs[err.argmax()]:g}")
