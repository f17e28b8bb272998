"""Phantom acquisition sites: a second "scanner" with known, planted differences.

Site ``A`` is the phantom as generated. Site ``B`` is the same patients seen by another scanner,
a deterministic transform of each image (seeded by the image's row, so every split and every run
sees the same pixels):

1. field of view: a centred crop to ``fov`` of the side (the anatomy looks larger), resized back
   to the original size (bilinear);
2. contrast curve: ``x ** gamma`` then ``contrast * (x - 0.5) + 0.5 + brightness`` on [0, 1];
3. detector noise: Gaussian, ``noise`` standard deviation;
4. a burned-in marker: a bright square of ``marker`` of the side in the top-right corner (a
   laterality / site marker that site A never shows).

Site ``C`` is a milder scanner: the same field of view and no marker, only another display curve
(gamma, contrast, brightness) and a little detector noise, the change a new detector or LUT of
the same vendor brings; it moves a model's scores more than its ranking.

Ground truth: labels and patients are unchanged, so an A-vs-B difference in a model's numbers is
caused by the scanner only. :data:`SITES` holds the profiles; :func:`apply_site` is the transform;
the ``phantom`` adapter takes ``site=B`` (e.g. ``phantom?n=2000&size=64&site=B``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medscalpel.errors import ConfigError


@dataclass(frozen=True)
class SiteProfile:
    """One scanner's deviations from site A (identity values = site A)."""

    name: str
    fov: float = 1.0
    gamma: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0
    noise: float = 0.0
    marker: float = 0.0
    seed: int = 0

    @property
    def identity(self) -> bool:
        return (self.fov, self.gamma, self.contrast, self.brightness, self.noise,
                self.marker) == (1.0, 1.0, 1.0, 0.0, 0.0, 0.0)

    def to_dict(self) -> dict:
        return asdict(self)


#: the built-in sites
SITES: dict[str, SiteProfile] = {
    "A": SiteProfile("A"),
    "B": SiteProfile("B", fov=0.85, gamma=0.7, contrast=0.8, brightness=0.05, noise=0.04,
                     marker=0.1, seed=20231),
    "C": SiteProfile("C", gamma=0.8, contrast=0.9, brightness=0.04, noise=0.015, seed=20232),
}


def get_site(name: str) -> SiteProfile:
    key = str(name).strip().upper()
    if key not in SITES:
        raise ConfigError(f"The 'site' parameter of the 'phantom' adapter must be one of "
                          f"{', '.join(repr(s) for s in SITES)}. Got {name!r} instead.")
    return SITES[key]


def _crop_resize(x: np.ndarray, fov: float) -> np.ndarray:
    """Centred crop of ``fov`` of the side of ``x`` ``[N, S, S]``, resized back to ``S``."""

    s = x.shape[-1]
    c = max(2, int(round(s * fov)))
    o = (s - c) // 2
    crop = torch.from_numpy(np.ascontiguousarray(x[:, o:o + c, o:o + c], np.float32))
    out = F.interpolate(crop[:, None], size=(s, s), mode="bilinear", align_corners=False)
    return out[:, 0].numpy()


def apply_site(images: np.ndarray, site: str | SiteProfile, rows: np.ndarray | None = None
               ) -> np.ndarray:
    """Site ``site``'s view of phantom images.

    Args:
        images: uint8 ``[N, S, S]`` site-A images.
        site: a name in :data:`SITES` or a :class:`SiteProfile`.
        rows: each image's row in the whole phantom (seeds its noise; default ``0..N-1``), so a
            split's images get the same pixels as the same rows of ``all``.

    Returns:
        uint8 ``[N, S, S]``.
    """
    prof = site if isinstance(site, SiteProfile) else get_site(site)
    if prof.identity:
        return images
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    x = images.astype(np.float32) / 255.0
    if prof.fov != 1.0:
        x = _crop_resize(x, prof.fov)
    x = np.clip(x, 0.0, 1.0) ** prof.gamma
    x = prof.contrast * (x - 0.5) + 0.5 + prof.brightness
    if prof.noise:
        s = x.shape[-1]
        for i, r in enumerate(rows):
            x[i] += np.random.default_rng([prof.seed, int(r)]).normal(0.0, prof.noise, (s, s))
    if prof.marker:
        s = x.shape[-1]
        m = max(2, int(round(s * prof.marker)))
        x[:, 1:1 + m, s - 1 - m:s - 1] = 1.0
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def site_masks(masks: dict[str, np.ndarray], site: str | SiteProfile) -> dict[str, np.ndarray]:
    """Ground-truth masks seen through the site's field of view (crop + nearest resize)."""
    prof = site if isinstance(site, SiteProfile) else get_site(site)
    if prof.fov == 1.0:
        return masks
    out = {}
    for k, m in masks.items():
        r = _crop_resize(m[None].astype(np.float32), prof.fov)[0]
        out[k] = r >= 0.5
    return out
