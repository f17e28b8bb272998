"""torchxrayvision adapter: xrv's DenseNet121 as a medscalpel model.

torchxrayvision's ``DenseNet`` is torchvision's DenseNet121 with one input channel, its own
pathology list and per-class operating thresholds (``op_threshs``) that turn outputs into
calibrated probabilities. medscalpel loads its weights into the ``densenet121`` zoo layout with
``op_threshs`` disabled, so outputs are logits, and records xrv's input contract: images scaled
to [-1024, 1024] (``mean=0.5, std=1/2048`` on [0, 1] grey images) at 224 px.

Weights come from a local file (a state dict; read with ``torch.load(weights_only=True)``, so a
file that pickles a whole model object is refused: save its ``state_dict()`` instead). Without a
file the ``xrv`` extra's own download is used, which needs internet access.
"""

from __future__ import annotations

import os

import torch

from medscalpel.data.transforms import Preprocess
from medscalpel.errors import CheckpointError, ModelError, optional_import
from medscalpel.models.checkpoint import map_foreign_keys, make_card, read_foreign_state_dict
from medscalpel.models.classifier import MedClassifier
from medscalpel.models.zoo import create_model

#: torchxrayvision's default pathology order (``xrv.datasets.default_pathologies``)
XRV_PATHOLOGIES = ("Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema",
                   "Emphysema", "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening",
                   "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion", "Fracture",
                   "Lung Opacity", "Enlarged Cardiomediastinum")


def xrv_preprocess(size: int = 224) -> Preprocess:
    """xrv's input contract: grey images in [-1024, 1024]."""
    return Preprocess(size=size, channels=1, mean=(0.5,), std=(1.0 / 2048.0,))


def load_xrv_densenet(weights: str | os.PathLike | None = None,
                      pathologies: tuple[str, ...] | list[str] = XRV_PATHOLOGIES,
                      xrv_weights: str = "densenet121-res224-all", size: int = 224
                      ) -> MedClassifier:
    """xrv's DenseNet121 as a :class:`MedClassifier` whose outputs are logits.

    Args:
        weights: a local state-dict file (``.pt``/``.pth``/``.safetensors``) of xrv's DenseNet;
            ``None`` asks the ``torchxrayvision`` package for ``xrv_weights`` (downloads).
        pathologies: the output order of those weights.
        size: input size recorded in the model card.
    """
    if weights is not None:
        state = read_foreign_state_dict(weights)
        source = str(weights)
    else:
        xrv = optional_import("torchxrayvision", "xrv", "loading torchxrayvision weights")
        try:
            net = xrv.models.DenseNet(weights=xrv_weights)
        except Exception as exc:  # noqa: BLE001 - network / cache failures of the extra
            raise ModelError(f"torchxrayvision could not provide the weights '{xrv_weights}': "
                             f"{exc}. Without internet access, pass a local state-dict file.") from exc
        state = net.state_dict()
        pathologies = tuple(net.pathologies)
        source = f"torchxrayvision:{xrv_weights}"
    state = {k: v for k, v in state.items() if "op_threshs" not in k}
    clf = state.get("classifier.weight")
    if clf is None:
        raise CheckpointError(f"{source} has no 'classifier.weight': not an xrv DenseNet state dict.")
    if clf.shape[0] != len(pathologies):
        raise CheckpointError(f"{source}: the classifier has {clf.shape[0]} outputs but "
                              f"{len(pathologies)} pathologies were given; pass the weights' "
                              "pathology list.")
    model = create_model("densenet121", num_classes=len(pathologies), in_chans=1, img_size=size)
    mapped = map_foreign_keys(state, model)
    own = model.state_dict()
    unknown = [k for k in mapped if k not in own]
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    if unknown or missing:
        raise CheckpointError(f"{source} does not fit xrv's DenseNet121: unknown keys "
                              f"{unknown[:3]}, missing {missing[:3]}.")
    bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"{source}: tensor shapes differ from DenseNet121 at {bad[:3]}.")
    with torch.no_grad():
        model.load_state_dict({**own, **mapped})
    model.card = make_card(model, list(pathologies), "multilabel", xrv_preprocess(size),
                           lineage=({"method": "import-xrv", "parent": source,
                                     "op_threshs": "disabled (outputs are logits)"},))
    model.eval()
    return model


