"""Once-for-all students (seed 004, issue 30): one elastic supernet trained by progressive
shrinking with knowledge distillation from a medscalpel teacher, then one subnet per latency
budget measured on the deployment runtime.

* :mod:`~medscalpel.compress.ofa.supernet`: the elastic network (kernel, depth, width) and the
  extraction of a subnet as a standalone ``ofa_subnet`` model;
* :mod:`~medscalpel.compress.ofa.train`: progressive shrinking, resumable;
* :mod:`~medscalpel.compress.ofa.search`: latency-budgeted search and :func:`distill_ofa`
  (train, search, extract, evaluate);
* :mod:`~medscalpel.compress.ofa.dominance`: does a subnet dominate a student on (latency,
  AUROC)? dominates / dominated / undecided per pair from one alternated timing run (sign test)
  and the paired bootstrap of the AUROC difference, Holm or Bonferroni over the pairs.
"""
