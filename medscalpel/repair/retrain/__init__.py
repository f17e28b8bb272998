"""Partial retraining of the final layer (and optionally the last block).

Three ways to change less than the whole model, cheapest first:

* :func:`finetune_classifier` - gradient fine-tune of the classifier ``nn.Linear`` on cached
  penultimate :class:`~medscalpel.engine.predict.Features` (a few hundred AdamW steps on an
  ``[N, C]`` matrix: seconds, no image is read). ``classes=`` restricts training to some rows;
  the other rows are restored after every step, so they stay bit-identical.
* :func:`reoptimize_classifier` - "F re-optimization": refit the final layer by regularised
  logistic regression (scikit-learn ``LogisticRegression``; one binary model per class for
  multi-label, one multinomial model for multi-class) on standardised features, with ``C``
  chosen on validation, and the standardisation folded back into ``W`` and ``b`` exactly.
* :func:`finetune_last_block` - fine-tune the last backbone block plus the classifier on images
  (everything else frozen, frozen BatchNorm statistics kept). The block is found by
  :func:`last_block_parameters` (or named with ``block=``).

Each returns a :class:`RetrainResult` with trainable parameters, seconds, and per-class AUROC
before / after on held-out features (or images).

The package is split by concept: :mod:`.result` (:class:`RetrainResult`, :func:`with_classifier`
and the shared feature helpers), :mod:`.finetune` (the gradient fine-tune on features),
:mod:`.reoptimize` (F re-optimization by logistic regression) and :mod:`.block` (the last-block
fine-tune on images).
"""

from medscalpel.repair.retrain.block import finetune_last_block, last_block_parameters
from medscalpel.repair.retrain.finetune import finetune_classifier
from medscalpel.repair.retrain.reoptimize import reoptimize_classifier
from medscalpel.repair.retrain.result import (SCHEMA, RetrainResult, per_class_auroc,
                                              with_classifier)

__all__ = ["SCHEMA", "RetrainResult", "finetune_classifier", "finetune_last_block",
           "last_block_parameters", "per_class_auroc", "reoptimize_classifier", "with_classifier"]
