"""Optimisers, updating parameters in place. Each equation sits above its line.

State is kept per parameter name and can be saved (``state_dict``: a flat dict of
numpy arrays and numbers) and restored (``load_state_dict``) for bit-exact resume.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import get_xp, to_device, to_numpy
from .kernels import Kernel


# elements per block of an elementwise update on the CPU: five float32 blocks (parameter,
# gradient, two moments, scratch) take 1.3 MB, within a core's L2. Adam on the deep MLP's
# 9.4 M float32 parameters (``python bench/step_parts.py``, 2-core AMD EPYC): 13.4-13.8 ms
# whole-array, 11.8-12.3 ms in blocks of 65,536
CPU_BLOCK = 65536


def _blocks(xp, p, g, *state):
    """Matching pieces of a parameter ``p``, its gradient ``g`` and its state arrays, all
    of one shape: on the CPU, flat blocks of ``CPU_BLOCK`` elements (views of ``p`` and the
    state, so that in-place updates reach them; a non-contiguous ``g``, only read, is read
    through one copy); on a GPU, or if ``p`` or the state is not C-contiguous, the whole
    arrays."""
    others = (g,) + state
    written = (p,) + state
    if xp is not np or p.size <= CPU_BLOCK or not all(a.flags.c_contiguous for a in written):
        yield (p,) + others
        return
    flat = [a.reshape(-1) for a in (p,) + others]
    for i in range(0, p.size, CPU_BLOCK):
        yield tuple(a[i:i + CPU_BLOCK] for a in flat)


def _adam_update(xp, eps_placement: str):
    """Adam's update of one parameter as one chain (``gait_ref.kernels``: one fused kernel
    on a GPU); the same operations, in the same order, as ``Adam._update_blocks``."""
    def adam(p, m, v, g, b1, c1, b2, c2, scale_v, eps, lr_t):
        # m_t = b1 m_{t-1} + (1 - b1) g
        m *= b1
        m += g * c1
        # v_t = b2 v_{t-1} + (1 - b2) g^2
        v *= b2
        v += g * g * c2
        if eps_placement == "hat":
            # theta -= lr * (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)
            p -= m / (xp.sqrt(v / scale_v) + eps) * lr_t
        else:
            # lr_t = lr sqrt(1 - b2^t) / (1 - b1^t);  theta -= lr_t m_t / (sqrt(v_t) + eps)
            p -= m / (xp.sqrt(v) + eps) * lr_t
    adam.__name__ = f"adam_{eps_placement}"
    return adam


def check_state_keys(kind: str, state: dict, expected: set) -> None:
    """ValueError naming the keys a saved optimiser state lacks or has beyond ``expected``."""
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"{kind} state does not fit the parameters: "
                         + "; ".join(f"{what} {keys[:4]}" + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
                                     for what, keys in (("missing", missing), ("unexpected", extra)) if keys))


class Adam:
    """Adam (Kingma & Ba 2014) with bias correction.

    eps_placement='hat' (the paper's Algorithm 1, PyTorch):
        theta -= lr * m_hat / (sqrt(v_hat) + eps)
    eps_placement='tf' (TensorFlow/Keras, the scaling reference code):
        theta -= lr_t * m / (sqrt(v) + eps),  lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t)
    """

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, eps_placement="hat"):
        if eps_placement not in ("hat", "tf"):
            raise ValueError(f"eps_placement must be 'hat' or 'tf', got {eps_placement!r}")
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.eps_placement = eps_placement
        self.t = 0
        self.m, self.v = {}, {}
        self._kernel = None

    def step(self, params: dict, grads: dict) -> None:
        """params[name] -= update(grads[name]), in place: one fused kernel per parameter on a
        GPU (``_adam_update``); on the CPU the same chain block by block (``_update_blocks``)."""
        self.t += 1
        b1, b2, t = self.beta1, self.beta2, self.t
        if self._kernel is None:
            self._kernel = Kernel(lambda xp: _adam_update(xp, self.eps_placement), twin=self._update_blocks,
                                  name=f"adam_{self.eps_placement}", inplace=(0, 1, 2))
        for name, p in params.items():
            g = grads[name]
            xp = get_xp(p, g)
            if name not in self.m:
                self.m[name], self.v[name] = xp.zeros_like(p), xp.zeros_like(p)
            one = p.dtype.type
            c1, c2 = one(1 - b1), one(1 - b2)
            if self.eps_placement == "hat":
                scale_v, lr_t = one(1 - b2 ** t), one(self.lr / (1 - b1 ** t))
            else:
                scale_v, lr_t = one(1), one(self.lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t))
            self._kernel(p, self.m[name], self.v[name], g, one(b1), c1, one(b2), c2, scale_v, one(self.eps), lr_t)

    def _update_blocks(self, p, m_all, v_all, g, b1, c1, b2, c2, scale_v, eps, lr_t):
        """``_adam_update`` on the host, in place with one scratch array and no other
        temporaries (Adam is memory traffic, a large part of a step on a CPU), block by block
        (``_blocks``), so that its dozen elementwise passes read each block from cache and the
        arrays cross memory about once."""
        xp = get_xp(p, g)
        tmp_all = None
        for p_, g_, m, v in _blocks(xp, p, g, m_all, v_all):
            if tmp_all is None or tmp_all.size < p_.size:
                tmp_all = xp.empty(p_.size, p.dtype)
            tmp = tmp_all[:p_.size].reshape(p_.shape)
            m *= b1                                        # m_t = b1 m_{t-1} + (1 - b1) g
            xp.multiply(g_, c1, out=tmp)
            m += tmp
            v *= b2                                        # v_t = b2 v_{t-1} + (1 - b2) g^2
            xp.multiply(g_, g_, out=tmp)
            tmp *= c2
            v += tmp
            if self.eps_placement == "hat":                # sqrt(v_t / (1 - b2^t)) + eps
                xp.divide(v, scale_v, out=tmp)
                xp.sqrt(tmp, out=tmp)
            else:                                          # sqrt(v_t) + eps
                xp.sqrt(v, out=tmp)
            tmp += eps
            xp.divide(m, tmp, out=tmp)                     # theta -= lr_t m_t / (...)
            tmp *= lr_t
            p_ -= tmp

    def state_dict(self) -> dict:
        state = {"t": self.t}
        for name in self.m:
            state[f"m/{name}"] = to_numpy(self.m[name])
            state[f"v/{name}"] = to_numpy(self.v[name])
        return state

    def load_state_dict(self, state: dict, xp, names=None) -> None:
        """Continue from ``state_dict()``; with ``names`` (the parameters it steps), a state
        that lacks a moment of one of them, or holds anything else, is refused."""
        if names is not None:
            stepped = int(state.get("t", 0)) > 0
            check_state_keys("Adam", state, {"t"} | ({f"{w}/{n}" for n in names for w in "mv"} if stepped else set()))
        self.t = int(state["t"])
        self.m = {k[2:]: to_device(v, xp) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: to_device(v, xp) for k, v in state.items() if k.startswith("v/")}


class SGD:
    """SGD with momentum and (L2) weight decay:
        g' = g + wd * theta;  u = mu * u + g';  theta -= lr * u."""

    def __init__(self, lr=1e-2, momentum=0.0, weight_decay=0.0):
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.t = 0
        self.u = {}

    def step(self, params: dict, grads: dict) -> None:
        self.t += 1
        for name, p in params.items():
            xp = get_xp(p)
            # g' = g + wd * theta
            g = grads[name] + self.weight_decay * p if self.weight_decay else grads[name]
            if self.momentum:
                if name not in self.u:
                    self.u[name] = xp.zeros_like(p)
                # u = mu * u + g'
                self.u[name] *= self.momentum
                self.u[name] += g
                g = self.u[name]
            # theta -= lr * u
            p -= (self.lr * g).astype(p.dtype, copy=False)

    def state_dict(self) -> dict:
        state = {"t": self.t}
        state.update({f"u/{k}": to_numpy(v) for k, v in self.u.items()})
        return state

    def load_state_dict(self, state: dict, xp, names=None) -> None:
        """Continue from ``state_dict()``; with ``names``, a state that lacks the momentum of
        one of them (or holds anything else) is refused."""
        if names is not None:
            stepped = int(state.get("t", 0)) > 0 and self.momentum
            check_state_keys("SGD", state, {"t"} | ({f"u/{n}" for n in names} if stepped else set()))
        self.t = int(state["t"])
        self.u = {k[2:]: to_device(v, xp) for k, v in state.items() if k.startswith("u/")}
