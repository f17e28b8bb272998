"""Deployment: what medscalpel serves and how fast it runs.

- :mod:`~medscalpel.deploy.export` -- ONNX export (torch's dynamo exporter, TorchScript fallback)
  with parity checks: :mod:`~medscalpel.deploy.export.onnx_file` writes the files,
  :mod:`~medscalpel.deploy.export.quantize` int8-quantises them;
  :mod:`~medscalpel.deploy.cam_head` adds the class-activation-map output.
- :mod:`~medscalpel.deploy.runtimes` -- the CPU runtimes (torch eager, ONNX Runtime, OpenVINO)
  and their precisions (fp32, bf16, int8).
- :mod:`~medscalpel.deploy.timing` -- the one latency loop and speed ratios with evidence;
  :mod:`~medscalpel.deploy.variant_timing` times the deploy variants and the GEMM peaks in rounds.
- :mod:`~medscalpel.deploy.flow` -- ``deploy()``: export, quantise, time, verdict per variant;
  :mod:`~medscalpel.deploy.plan` what one call measures (variants, settings, images),
  :mod:`~medscalpel.deploy.decide` the verdicts and the recommendation,
  :mod:`~medscalpel.deploy.assemble` the result and the run directory;
  :mod:`~medscalpel.deploy.result` its typed result, :mod:`~medscalpel.deploy.serve` the
  ``serve.json`` of the chosen variant, :mod:`~medscalpel.deploy.cam` the CAM parity checks.
- :mod:`~medscalpel.deploy.served` -- loading a served run directory as a model every stage can
  run (predict, evaluate, explain cam, report clinical, audit changes).
"""
