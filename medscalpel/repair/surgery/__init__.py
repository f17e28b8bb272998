"""Surgical correction: zero a few weights of one classifier row to remove false positives.

Because ``logit_k = sum_c W[k, c] f_c(x) + b_k``, zeroing ``W[k, S]`` lowers image ``x``'s logit
for class ``k`` by exactly ``sum_{c in S} W[k, c] f_c(x)`` and leaves every other row, hence
every other class's logit, untouched. The procedure:

1. **Rank** the penultimate channels by how much more they push class ``k`` up on the target false
   positives than on ``k``'s true positives of the validation set:
   ``score_c = mean_FP(W[k,c] f_c) - mean_TP(W[k,c] f_c)`` (in logit units; the report also gives
   ``score_c / sum |score|``). Only channels with a positive score and a positive mean
   contribution on the targets are candidates.
2. **Search** (exactly, on cached features): add candidates in rank order, skipping one whose
   addition would push more validation true positives below threshold than ``tp_loss_budget``
   allows, until the goal is met (the targets' probability falls by ``delta_prob``, on average or
   for every target, or every target falls below its threshold); then a **pruning pass** drops any
   weight whose removal keeps the goal and the constraint; then an **exhaustive pass** looks for a
   smaller feasible set among the ``pool`` best-ranked candidates (when the number of subsets is
   small enough), so the set returned is the smallest within that pool.
   With ``adjust_bias=True`` the bias ``b_k`` may move as well: the shift closest to zero that
   keeps the true positives and still meets the goal.
3. **Plan, then apply**: :class:`SurgeryPlan` is data (row, channels, old weights, old/new bias);
   ``dry_run=True`` stops there.
4. **Verify** through the live ``nn.Linear``: the targets' probability change (mean and each),
   true positives lost, per-class AUROC before / after on the validation features, and that every
   other class's logits are bit-identical (``torch.equal``), which is checked, not assumed.

The package is split by concept: :mod:`.helpers` (indices, contributions, margins; shared with
triage, retrain and treatments), :mod:`.plan` (the plan and its search), :mod:`.result`,
:mod:`.correct` (validate -> plan -> apply -> verify), :mod:`.rules` (surgery from a rule) and
:mod:`.ladder` (the goal ladder).
"""

from medscalpel.repair.surgery.correct import save_surgery, surgical_correction
from medscalpel.repair.surgery.helpers import class_index, class_probs, contributions, margins
from medscalpel.repair.surgery.ladder import SurgeryLadder, surgery_ladder
from medscalpel.repair.surgery.plan import SurgeryPlan
from medscalpel.repair.surgery.result import SurgeryResult
from medscalpel.repair.surgery.rules import confounder_flags, surgery_from_rule

__all__ = ["SurgeryLadder", "SurgeryPlan", "SurgeryResult", "class_index", "class_probs",
           "confounder_flags", "contributions", "margins", "save_surgery", "surgery_from_rule",
           "surgery_ladder", "surgical_correction"]
