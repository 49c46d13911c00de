"""Compare a graph's onnxruntime outputs with its torch module, in the columns of
Ascend's own compare tool: max/mean abs error, cosine similarity, relative Euclidean distance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlm2om.runtime.errors import Vlm2omError

# Cosine floor and relative-Euclidean ceiling by export dtype. fp16 stores ~3 decimal
# digits, so a 1e-2 relative error is where real fp16 breakage starts (cf. ATC's 0.99 cosine).
THRESHOLDS = {
    "float32": {"cosine": 0.99999, "rel_euclid": 1e-4},
    "float16": {"cosine": 0.999, "rel_euclid": 1e-2},
}
# End to end (`vlm2om verify --reference`): the seeds' precision report asks every generated
# token's logits to reach cosine 0.9999 against the reference; a greedy token may differ only
# where the reference's top-2 logits are closer than ``tie_margin`` (a tie either side may break).
E2E_THRESHOLDS = {
    "float32": {"logits_cosine": 0.9999, "tie_margin": 1e-3},
    "float16": {"logits_cosine": 0.999, "tie_margin": 5e-2},
}


class VerificationError(Vlm2omError):
    pass


@dataclass
class Metrics:
    graph: str
    output: str
    gear: dict
    max_abs: float
    mean_abs: float
    cosine: float
    rel_euclid: float
    passed: bool

    def as_dict(self) -> dict:
        return {"graph": self.graph, "output": self.output, "gear": self.gear, "max_abs": self.max_abs,
                "mean_abs": self.mean_abs, "cosine": self.cosine, "rel_euclid": self.rel_euclid,
                "passed": self.passed}

    def row(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        gear = ",".join(f"{k}={v}" for k, v in self.gear.items()) or "static"
        return (f"  {mark} {self.graph:<10} {self.output:<14} {gear:<18} max_abs={self.max_abs:.3e} "
                f"mean_abs={self.mean_abs:.3e} cos={self.cosine:.7f} rel_euclid={self.rel_euclid:.3e}")


def compare(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    a = np.asarray(actual, np.float64).ravel()
    e = np.asarray(expected, np.float64).ravel()
    diff = a - e
    denom = np.linalg.norm(a) * np.linalg.norm(e)
    cos = float(a @ e / denom) if denom > 0 else float(np.array_equal(a, e))
    ref = np.linalg.norm(e)
    rel = float(np.linalg.norm(diff) / ref) if ref > 0 else float(np.linalg.norm(diff))
    return {"max_abs": float(np.abs(diff).max(initial=0.0)), "mean_abs": float(np.abs(diff).mean()),
            "cosine": cos, "rel_euclid": rel}


def judge(graph: str, output: str, gear: dict, actual, expected, dtype: str,
          thresholds: dict | None = None) -> Metrics:
    if actual.shape != expected.shape:
        raise VerificationError(f"graph '{graph}' output '{output}' at gear {gear}: onnxruntime shape "
                                f"{actual.shape} != torch shape {expected.shape}")
    m = compare(actual, expected)
    t = thresholds or THRESHOLDS[dtype]
    ok = m["cosine"] >= t["cosine"] and m["rel_euclid"] <= t["rel_euclid"] and np.isfinite(actual).all()
    return Metrics(graph, output, gear, passed=bool(ok), **m)


def raise_on_failures(rows: list[Metrics], dtype: str) -> None:
    bad = [r for r in rows if not r.passed]
    if bad:
        t = THRESHOLDS[dtype]
        raise VerificationError(
            f"onnxruntime disagrees with torch (thresholds for {dtype}: cosine >= {t['cosine']}, "
            f"rel_euclid <= {t['rel_euclid']}):\n" + "\n".join(r.row() for r in bad))
