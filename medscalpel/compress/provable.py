"""Provable (data-free) channel analysis for lossless folding.

Every channel of every tensor in the network is described, from the weights alone, as an affine
function of a *signal*: ``u = t * R_s + c`` where ``R_s`` is some function of the input image and
``t``, ``c`` are numbers (``t == 0``: the channel is the constant ``c`` for *every* input). Two
channels with the same signal ``s`` are exactly affinely related for every input. Signals are
created and shared by exact rules:

* **Conv2d / Linear** (``groups == 1``): output ``o`` is ``conv(x, w_o) + b_o``. Input channels
  that are provably zero contribute nothing (even at zero-padded borders); through an unpadded
  conv, constant input channels contribute a constant. A filter that is all zero on the rest
  gives a constant channel; filters that are proportional (``w_p = s * w_o``, checked to
  ``weight_rtol`` relative to the largest weight) share one signal.
* **BatchNorm (eval)**: a per-channel affine map ``a * u + (beta - a * mean)``; ``gamma == 0``
  makes the channel the constant ``beta`` exactly.
* **ReLU**: ``relu(t R + c) = |t| relu(sign(t) R + c / |t|)`` (ReLU is positively homogeneous):
  channels with the same ``(signal, sign, c / |t|)`` share the new signal; a constant stays
  constant (``relu(c)``, zero when ``c <= 0``: *dead*).
* **Max pooling** (padding is ``-inf``): ``max(t R + c) = |t| max(sign(t) R) + c``; **average
  pooling** and **adaptive average pooling** are linear (constants survive unless zero padding is
  averaged in); **concatenation** keeps the channels; **addition** combines the affine forms
  (residual streams); flatten of a ``[N, C, 1, 1]`` map, dropout in eval mode, contiguous/clone
  keep them.
* Anything else gives every output channel a fresh, unrelated signal (sound: nothing is claimed).

The rules are applied while the model runs once on a dummy input (a ``TorchFunctionMode`` sees
every torch call; the values of the dummy input are never used for a decision, only the control
flow and shapes). What each consumer (Conv2d / Linear) reads is recorded; :func:`plan_provable`
then decides, exactly like the empirical planner but from these facts, which channels are
dead, constant (folded only where that is exact: 1x1 / unpadded convs and Linear layers, into
the bias or the following BatchNorm's running mean) or dependent (folded into the consumers'
weights), and returns a :class:`~medscalpel.compress.lossless.LosslessPlan`.

The guarantee holds for every finite input, up to float32 rounding (folding changes the order of
floating-point operations) and ``weight_rtol`` (the relative difference allowed between a filter
and a scaled copy of another; ``0.0`` demands exact proportionality).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from medscalpel.compress.graph import ChannelGraph, build_channel_graph
from medscalpel.compress.plans import GroupPlan, LosslessPlan, SiteFold
from medscalpel.errors import ModelError
from medscalpel.progress import track
from medscalpel.validation import check_range

CONST = -1  # the "signal" of a constant channel


@dataclass
class Facts:
    """Per-channel affine facts of one tensor: ``u[k] = t[k] * R[sid[k]] + c[k]``."""

    sid: np.ndarray
    t: np.ndarray
    c: np.ndarray

    def __len__(self) -> int:
        return len(self.sid)

    def normalised(self) -> "Facts":
        const = self.t == 0.0
        sid = self.sid.copy()
        sid[const] = CONST
        return Facts(sid, np.where(const, 0.0, self.t), self.c.copy())

    def take(self, idx) -> "Facts":
        return Facts(self.sid[idx], self.t[idx], self.c[idx])


def _f64(t: torch.Tensor | None, n: int, default: float) -> np.ndarray:
    if t is None:
        return np.full(n, default)
    return t.detach().double().cpu().numpy().reshape(-1)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _all_zero(v: Any) -> bool:
    if isinstance(v, str):
        return v == "valid"
    if isinstance(v, (tuple, list)):
        return all(int(p) == 0 for p in v)
    return int(v) == 0


class _Interpreter(TorchFunctionMode):
    """Runs alongside one forward pass and keeps :class:`Facts` for every tensor it sees."""

    def __init__(self, names: dict[int, str], rtol: float):
        super().__init__()
        self.rtol = rtol
        self.names = names             # id(weight) -> module name
        self.facts: dict[int, tuple[torch.Tensor, Facts]] = {}
        self.sites: dict[str, Facts] = {}
        self.keys: dict[Any, int] = {}
        self.next_sid = 0
        self.calls = 0
        self._build_tables()

    # -------------------------------------------------------------- bookkeeping
    def _build_tables(self) -> None:
        T = torch.Tensor
        self.conv = {torch.conv2d, F.conv2d}
        self.linear = {F.linear}
        self.bn = {F.batch_norm, torch.batch_norm}
        self.relu = {F.relu, torch.relu, torch.relu_, T.relu, T.relu_}
        self.maxpool = {F.max_pool2d, torch.max_pool2d, F.max_pool2d_with_indices,
                        F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices}
        self.avgpool = {F.avg_pool2d, torch.avg_pool1d}
        self.aavgpool = {F.adaptive_avg_pool2d}
        self.cat = {torch.cat, torch.concat}
        self.add = {torch.add, T.add, T.add_, T.__add__, T.__iadd__, T.__radd__}
        self.mul = {torch.mul, T.mul, T.mul_, T.__mul__, T.__imul__, T.__rmul__}
        self.reshape = {torch.flatten, T.flatten, T.view, T.reshape, torch.reshape}
        self.dropout = {F.dropout, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout}
        self.same = {T.contiguous, T.clone, torch.clone, T.detach, T.float}

    def fresh(self, n: int) -> Facts:
        sid = np.arange(self.next_sid, self.next_sid + n, dtype=np.int64)
        self.next_sid += n
        return Facts(sid, np.ones(n), np.zeros(n))

    def intern(self, key: Any) -> int:
        if key not in self.keys:
            self.keys[key] = self.next_sid
            self.next_sid += 1
        return self.keys[key]

    def get(self, x: torch.Tensor) -> Facts:
        hit = self.facts.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        f = self.fresh(x.shape[1] if x.ndim >= 2 else 1)
        self.facts[id(x)] = (x, f)
        return f

    def put(self, out: Any, f: Facts) -> None:
        if isinstance(out, torch.Tensor):
            self.facts[id(out)] = (out, f.normalised())

    def _group(self, bucket: list, values: np.ndarray, prefix: Any) -> np.ndarray:
        """Signals for channels whose discrete key is ``bucket[k]`` and whose float parameter is
        ``values[k]``: the same signal when the key is equal and the value within ``rtol``."""
        sids = np.empty(len(bucket), dtype=np.int64)
        leaders: dict[Any, list[tuple[float, int]]] = {}
        for k, (key, v) in enumerate(zip(bucket, values)):
            cands = leaders.setdefault(key, [])
            for lv, lsid in cands:
                if abs(v - lv) <= self.rtol * max(1.0, abs(lv)):
                    sids[k] = lsid
                    break
            else:
                sid = self.intern((prefix, key, len(cands)))
                cands.append((float(v), sid))
                sids[k] = sid
        return sids

    # -------------------------------------------------------------- rules
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = None
        if func in self.conv or func in self.linear:
            ins = self.get(args[0]) if isinstance(args[0], torch.Tensor) else None
        elif func in self.add or func in self.mul or func in self.same or \
                func in self.reshape or func in self.relu or func in self.bn or \
                func in self.maxpool or func in self.avgpool or func in self.aavgpool or \
                func in self.dropout:
            if args and isinstance(args[0], torch.Tensor):
                ins = self.get(args[0])
        other = None
        if (func in self.add or func in self.mul) and len(args) > 1 and \
                isinstance(args[1], torch.Tensor):
            other = self.get(args[1])
        cat_in = None
        if func in self.cat:
            seq = _arg(args, kwargs, 0, "tensors")
            cat_in = [self.get(t) for t in seq] if all(isinstance(t, torch.Tensor)
                                                      for t in seq) else None
        out = func(*args, **kwargs)
        self.calls += 1
        try:
            f = self._rule(func, args, kwargs, out, ins, other, cat_in)
        except (ValueError, TypeError, IndexError, KeyError):
            f = None
        main = out[0] if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) \
            else out
        if isinstance(main, torch.Tensor):
            n = main.shape[1] if main.ndim >= 2 else 1
            if f is None or len(f) != n:
                f = self.fresh(n)
            self.put(main, f)
        if isinstance(out, tuple):
            for o in out[1:]:
                if isinstance(o, torch.Tensor):
                    self.put(o, self.fresh(o.shape[1] if o.ndim >= 2 else 1))
        return out

    def _rule(self, func, args, kwargs, out, ins: Facts | None, other: Facts | None,
              cat_in: list[Facts] | None) -> Facts | None:
        if func in self.conv or func in self.linear:
            return self._linear_map(func, args, kwargs, ins)
        if func in self.bn:
            x, rm, rv = args[0], _arg(args, kwargs, 1, "running_mean"), \
                _arg(args, kwargs, 2, "running_var")
            if _arg(args, kwargs, 5, "training", False) or rm is None or rv is None:
                return None
            n = x.shape[1]
            w = _f64(_arg(args, kwargs, 3, "weight"), n, 1.0)
            b = _f64(_arg(args, kwargs, 4, "bias"), n, 0.0)
            eps = float(_arg(args, kwargs, 7, "eps", 1e-5))
            a = w / np.sqrt(_f64(rv, n, 1.0) + eps)
            shift = b - a * _f64(rm, n, 0.0)
            return Facts(ins.sid.copy(), a * ins.t, a * ins.c + shift)
        if func in self.relu:
            return self._relu(ins)
        if func in self.maxpool:
            return self._pool(ins, ("max", self.calls), keep_const=True, positive=True)
        if func in self.aavgpool:
            return self._pool(ins, ("aavg", self.calls), keep_const=True, positive=False)
        if func in self.avgpool:
            pad = _arg(args, kwargs, 3, "padding", 0)
            ceil = bool(_arg(args, kwargs, 4, "ceil_mode", False))
            div = _arg(args, kwargs, 6, "divisor_override", None)
            exact = _all_zero(pad) and not ceil and div is None
            return self._pool(ins, ("avg", self.calls), keep_const=exact, positive=False)
        if func in self.cat:
            dim = int(_arg(args, kwargs, 1, "dim", 0))
            if cat_in is None or not isinstance(out, torch.Tensor) or \
                    dim % out.ndim != 1:
                return None
            return Facts(np.concatenate([f.sid for f in cat_in]),
                         np.concatenate([f.t for f in cat_in]),
                         np.concatenate([f.c for f in cat_in]))
        if func in self.add:
            return self._add(args, kwargs, out, ins, other)
        if func in self.mul:
            k = args[1] if len(args) > 1 else None
            if ins is None or isinstance(k, torch.Tensor) or not isinstance(k, (int, float)):
                return None
            return Facts(ins.sid.copy(), ins.t * k, ins.c * k)
        if func in self.reshape:
            x = args[0]
            if ins is not None and isinstance(out, torch.Tensor) and x.ndim == 4 and \
                    out.ndim == 2 and x.shape[2:] == (1, 1) and out.shape[1] == x.shape[1]:
                return ins
            return None
        if func in self.dropout:
            p = float(_arg(args, kwargs, 1, "p", 0.5))
            training = bool(_arg(args, kwargs, 2, "training", True))
            return ins if (not training or p == 0.0) else None
        if func in self.same:
            return ins if isinstance(out, torch.Tensor) and out.shape == args[0].shape else None
        return None

    def _linear_map(self, func, args, kwargs, ins: Facts | None) -> Facts | None:
        x, weight = args[0], _arg(args, kwargs, 1, "weight")
        bias = _arg(args, kwargs, 2, "bias")
        if ins is None or not isinstance(weight, torch.Tensor):
            return None
        name = self.names.get(id(weight))
        if name is not None:
            self.sites[name] = ins
        if func in self.conv:
            padded = not _all_zero(_arg(args, kwargs, 4, "padding", 0))
            if int(_arg(args, kwargs, 6, "groups", 1)) != 1:
                return None
        else:
            padded = False
            if x.ndim != 2:
                return None
        w = weight.detach().double().cpu().numpy()
        o = w.shape[0]
        w = w.reshape(o, w.shape[1], -1)
        b = _f64(bias, o, 0.0)
        dead = (ins.t == 0.0) & (ins.c == 0.0)
        const = (ins.t == 0.0) & ~dead
        c_out = b.copy()
        use = ~dead
        if not padded and const.any():
            c_out = c_out + (w[:, const, :].sum(-1) * ins.c[const][None, :]).sum(1)
            use = use & ~const
        flat = w[:, use, :].reshape(o, -1)
        sid = np.full(o, CONST, dtype=np.int64)
        t = np.zeros(o)
        if flat.shape[1]:
            big = np.abs(flat).max(1)
            rows = np.nonzero(big > 0)[0]
            if len(rows):
                piv = np.abs(flat[rows]).argmax(1)
                scale = flat[rows, piv]
                norm = flat[rows] / scale[:, None]
                keys = {}
                grid = max(10.0 * self.rtol, 1e-5)  # candidate buckets; verified below
                for r, p, s, v in zip(rows, piv, scale, norm):
                    key = (int(p), (np.round(v / grid) + 0.0).tobytes())
                    hit = None
                    for lead, lv in keys.get(key, []):
                        if np.abs(v - lv).max() <= self.rtol:
                            hit = lead
                            break
                    if hit is None:
                        hit = self.intern(("lin", self.calls, int(r)))
                        keys.setdefault(key, []).append((hit, v))
                    sid[r] = hit
                    t[r] = s
        return Facts(sid, t, c_out)

    def _relu(self, ins: Facts | None) -> Facts | None:
        if ins is None:
            return None
        const = ins.t == 0.0
        sign = np.sign(ins.t)
        k = np.where(const, 0.0, ins.c / np.where(const, 1.0, np.abs(ins.t)))
        bucket = [(int(s), int(g)) for s, g in zip(ins.sid, sign)]
        sid = self._group(bucket, k, "relu")
        sid[const] = CONST
        return Facts(sid, np.abs(ins.t), np.where(const, np.maximum(ins.c, 0.0), 0.0))

    def _pool(self, ins: Facts | None, key: Any, keep_const: bool, positive: bool) -> Facts | None:
        if ins is None:
            return None
        n = len(ins)
        sid = np.empty(n, dtype=np.int64)
        t = np.abs(ins.t) if positive else ins.t.copy()
        c = ins.c.copy()
        for k in range(n):
            if ins.t[k] == 0.0 and keep_const:
                sid[k] = CONST
            elif ins.t[k] == 0.0:
                # a constant through a padded average: a fixed, position-dependent pattern
                if ins.c[k] == 0.0:
                    sid[k] = CONST
                else:
                    sid[k], t[k], c[k] = self.intern((key, "const", k)), 1.0, 0.0
            else:
                g = int(np.sign(ins.t[k])) if positive else 1
                if not keep_const and ins.c[k] != 0.0:
                    sid[k] = self.intern((key, int(ins.sid[k]), g, "c", k))
                    t[k], c[k] = 1.0, 0.0
                else:
                    sid[k] = self.intern((key, int(ins.sid[k]), g))
        return Facts(sid, t, c)

    def _add(self, args, kwargs, out, ins: Facts | None, other: Facts | None) -> Facts | None:
        if ins is None:
            return None
        alpha = float(kwargs.get("alpha", 1.0))
        y = args[1] if len(args) > 1 else kwargs.get("other")
        if isinstance(y, (int, float)):
            return Facts(ins.sid.copy(), ins.t.copy(), ins.c + alpha * y)
        if other is None or not isinstance(out, torch.Tensor) or \
                args[0].shape != y.shape or len(other) != len(ins):
            return None
        n = len(ins)
        sid = np.empty(n, dtype=np.int64)
        t = np.empty(n)
        c = ins.c + alpha * other.c
        pairs, ratios, idx = [], [], []
        for k in range(n):
            s1, t1 = int(ins.sid[k]), float(ins.t[k])
            s2, t2 = int(other.sid[k]), alpha * float(other.t[k])
            if t2 == 0.0 or t1 == 0.0 or s1 == s2:
                tt = t1 + t2 if s1 == s2 else (t1 if t2 == 0.0 else t2)
                sid[k], t[k] = (s1 if t1 != 0.0 else s2), tt
                if tt == 0.0:
                    sid[k] = CONST
                continue
            (sa, ta), (sb, tb) = sorted([(s1, t1), (s2, t2)])
            pairs.append((sa, sb))
            ratios.append(tb / ta)
            t[k] = ta
            idx.append(k)
        if idx:
            sid[idx] = self._group(pairs, np.asarray(ratios), "add")
        return Facts(sid, t, c)


def channel_facts(model: nn.Module, example: torch.Tensor,
                  weight_rtol: float = 1e-6) -> dict[str, Facts]:
    """The provable facts about what every Conv2d / Linear layer of ``model`` reads.

    Args:
        model: the model (a copy is analysed in eval mode; ``model`` is not changed).
        example: an input batch (only its shape is used; values never decide anything).
        weight_rtol: relative tolerance of the filter proportionality test.

    Returns:
        Module name -> :class:`Facts` of its input channels (consumers that ran).
    """
    work = copy.deepcopy(model).eval()
    names = {}
    for name, mod in work.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            names[id(mod.weight)] = name
    interp = _Interpreter(names, weight_rtol)
    with torch.no_grad(), interp:
        work(torch.zeros_like(example[:1]))
    return interp.sites


# ----------------------------------------------------------------------------- decisions
class _SiteBasis:
    """The channels a consumer keeps, indexed by signal, for exact folding."""

    def __init__(self) -> None:
        self.aff: dict[int, tuple[int, float, float]] = {}
        self.pure: dict[int, tuple[int, float]] = {}
        self.one: tuple[int, float] | None = None

    def keep(self, j: int, f: tuple[int, float, float]) -> None:
        s, t, c = f
        if t == 0.0:
            if c != 0.0 and self.one is None:
                self.one = (j, c)
            return
        self.aff.setdefault(s, (j, t, c))
        if c == 0.0:
            self.pure.setdefault(s, (j, t))


def _site_decision(intercept_ok: bool, dependent: bool, basis: _SiteBasis,
                   f: tuple[int, float, float]):
    """(kind, basis channels, coefficients, intercept) or None when the channel must stay."""
    s, t, c = f
    if t == 0.0 and c == 0.0:
        return "dead", (), (), 0.0
    if t == 0.0 and intercept_ok:
        return "constant", (), (), c
    if not dependent:
        return None
    if intercept_ok:
        if s in basis.aff:
            k, tk, ck = basis.aff[s]
            a = t / tk
            return "dependent", (k,), (a,), c - a * ck
        return None
    idx, coefs = [], []
    if t != 0.0:
        if s not in basis.pure:
            return None
        k, tk = basis.pure[s]
        idx.append(k)
        coefs.append(t / tk)
    if c != 0.0:
        if basis.one is None:
            return None
        k, ck = basis.one
        idx.append(k)
        coefs.append(c / ck)
    return ("constant" if t == 0.0 else "dependent"), tuple(idx), tuple(coefs), 0.0


def plan_provable(model: nn.Module, example: torch.Tensor, weight_rtol: float = 1e-6,
                  dependent: bool = True, progress: bool | None = None):
    """Find the channels of ``model`` that are dead, constant or dependent for *every* input.

    Args:
        model: a MedClassifier-like CNN whose ``classifier`` is an ``nn.Linear`` (not modified).
        example: one input batch (its shape defines the plan's input shape; its values are
            never used for a decision).
        weight_rtol: relative tolerance of the filter proportionality test (0: exact).
        dependent: also fold duplicate / proportional channels (False: dead and constant only).
        progress: show a progress bar.

    Returns:
        A :class:`~medscalpel.compress.lossless.LosslessPlan` with ``settings["mode"] ==
        "provable"`` and ``n_calib == 0``.
    """

    check_range(weight_rtol, "weight_rtol", "plan_provable", 0.0, 1.0)
    if not hasattr(model, "classifier") or not isinstance(model.classifier, nn.Linear):
        raise ModelError("plan_provable needs a MedClassifier-like model whose 'classifier' is "
                         "an nn.Linear (the output layer, which is never pruned).")
    if not isinstance(example, torch.Tensor) or example.ndim != 4:
        raise ModelError("plan_provable: 'example' must be an image batch [N, C, H, W].")
    example = example[:1].float()
    work = copy.deepcopy(model).eval()
    graph: ChannelGraph = build_channel_graph(work, example, ignored=[work.classifier])
    facts = channel_facts(work, example, weight_rtol)
    bases = {name: _SiteBasis() for name in graph.sites}

    def fact(sname: str, j: int) -> tuple[int, float, float] | None:
        f = facts.get(sname)
        if f is None or j >= len(f):
            return None
        return int(f.sid[j]), float(f.t[j]), float(f.c[j])

    for name, site in graph.sites.items():
        for j in range(site.channels):
            if j not in site.owners and (fj := fact(name, j)) is not None:
                bases[name].keep(j, fj)
    groups, folds = [], []
    for cg in track(graph.groups, "provable channel analysis", progress=progress):
        removed, kinds, group_folds = [], [], []
        for ch in range(cg.size):
            per_site = {}
            ok = cg.supported
            for sname, idxs in cg.sites.items():
                fj = fact(sname, idxs[ch])
                dec = None if fj is None else _site_decision(
                    graph.sites[sname].intercept_ok, dependent, bases[sname], fj)
                if dec is None:
                    ok = False
                per_site[sname] = dec
            if ok:
                site_kinds = [d[0] for d in per_site.values()]
                overall = ("dead" if all(k == "dead" for k in site_kinds) else
                           "constant" if all(k in ("dead", "constant") for k in site_kinds)
                           else "dependent")
                removed.append(ch)
                kinds.append(overall)
                group_folds.append([SiteFold(sname, cg.sites[sname][ch], d[0], d[1], d[2],
                                             float(d[3])) for sname, d in per_site.items()])
            else:
                for sname, idxs in cg.sites.items():
                    fj = fact(sname, idxs[ch])
                    if fj is not None:
                        bases[sname].keep(idxs[ch], fj)
        if removed and len(removed) == cg.size:
            removed, kinds, group_folds = removed[1:], kinds[1:], group_folds[1:]
        for fl in group_folds:
            folds.extend(fl)
        groups.append(GroupPlan(cg.root, cg.size, tuple(removed), tuple(kinds), cg.supported,
                                cg.reason, tuple(cg.sites)))
    sites = tuple({**s.describe(), "samples": 0, "dependency_tested": s.name in facts}
                  for s in graph.sites.values())
    settings = {"mode": "provable", "weight_rtol": weight_rtol, "dependent": dependent}
    return LosslessPlan(getattr(model, "arch", type(model).__name__), tuple(example.shape),
                        tuple(groups), tuple(folds), sites, settings, 0)


def random_inputs(shape: tuple[int, ...], n: int, low: float, high: float,
                  seed: int = 0) -> torch.Tensor:
    """``n`` seeded random inputs of ``shape[1:]`` spread *wider* than ``[low, high]``: half
    i.i.d. uniform on ``[low - w, high + w]`` (``w = high - low``), half smooth (upsampled
    coarse noise on the same range) with a random contrast, for verification on inputs that are
    nothing like the calibration images."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape[1:]
    width = max(high - low, 1e-6)
    lo, hi = low - width, high + width
    n1 = n // 2
    a = lo + (hi - lo) * torch.rand(n1, c, h, w, generator=g)
    coarse = torch.rand(n - n1, c, max(2, h // 8), max(2, w // 8), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    gain = torch.rand(n - n1, 1, 1, 1, generator=g)
    b = lo + (hi - lo) * (0.5 + gain * (smooth - 0.5))
    return torch.cat([a, b]).float()


def input_range_of(model: nn.Module) -> tuple[float, float]:
    """The normalised range of ``[0, 1]`` images under the model card's preprocessing
    (``(-3, 3)`` without a card)."""
    card = getattr(model, "card", None)
    try:
        pre = card.preprocess if card is not None else None
    except (AttributeError, KeyError, TypeError, ValueError):
        pre = None
    if pre is None:
        return -3.0, 3.0
    lows = [(0.0 - m) / s for m, s in zip(pre.mean, pre.std)]
    highs = [(1.0 - m) / s for m, s in zip(pre.mean, pre.std)]
    lo, hi = min(lows), max(highs)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return -3.0, 3.0
    return float(lo), float(hi)
