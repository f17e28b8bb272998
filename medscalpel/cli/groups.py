"""Wiring of the stage command groups into the main app (each stage's commands live in their
own ``*_cmd.py`` module as plain functions)."""

from __future__ import annotations

import typer

from medscalpel.cli import deprecations


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    from medscalpel.cli import (audit_cmd, calibrate_cmd, changes_cmd, compress_cmd, data_cmd,
                                distill_cmd, explain_cmd, lossless_cmd, phantom_cmd, repair_cmd,
                                report_cmd, scale_cmd, shift_cmd)

    from medscalpel.cli import show_cmd

    app.command("show")(show_cmd.show)
    data_app.command("stats")(data_cmd.stats)
    data_app.command("phantom")(phantom_cmd.phantom)

    compress_app = typer.Typer(no_args_is_help=True,
                               help="Compress: lossless folding, sparsity sweeps, structured "
                                    "pruning, distillation, ONNX export.")
    compress_app.command("lossless")(lossless_cmd.lossless)
    for name in ("sweep", "prune", "export"):
        compress_app.command(name)(getattr(compress_cmd, name))
    compress_app.command("distill")(distill_cmd.distill)
    compress_app.command("students")(distill_cmd.students)
    from medscalpel.cli import deploy_cmd  # compress deploy (issue 15)

    compress_app.command("deploy")(deploy_cmd.deploy)
    app.add_typer(compress_app, name="compress")

    repair_app = typer.Typer(no_args_is_help=True,
                             help="Repair: threshold calibration, surgical correction, partial "
                                  "retraining, the cost-aware treatment router.")
    repair_app.command("calibrate")(calibrate_cmd.calibrate)
    for name in ("surgery", "retrain", "triage"):
        repair_app.command(name)(getattr(repair_cmd, name))
    repair_app.command("recalibrate-site")(shift_cmd.recalibrate_site)
    app.add_typer(repair_app, name="repair")

    audit_app = typer.Typer(no_args_is_help=True,
                            help="Audit what compression did: forgettability curves, FCD, PIEs, "
                                 "what compression changed (calibration, explanations, "
                                 "subgroups, robustness).")
    audit_app.command("forgettability")(audit_cmd.forgettability)
    audit_app.command("pies")(audit_cmd.pies)
    # polarity lives in explain (module, outputs); the audit name stays as a hidden alias
    audit_app.command("polarity", hidden=True)(
        deprecations.old_command("audit polarity", explain_cmd.polarity))
    audit_app.command("changes")(changes_cmd.changes)
    app.add_typer(audit_app, name="audit")

    report_app = typer.Typer(no_args_is_help=True,
                             help="Reports: per-image clinical reports, one HTML experiment report.")
    report_app.command("clinical")(report_cmd.clinical)
    report_app.command("experiment")(report_cmd.experiment)
    app.add_typer(report_app, name="report")

    scale_cmd.register(app)

    explain_app = typer.Typer(no_args_is_help=True,
                              help="Explain: CAMs, pixel attributions (IG, LRP, DL-Backtrace), "
                                   "classifier-channel evidence, polarized channels, "
                                   "teacher-student saliency comparison.")
    for name in ("cam", "attribute", "channels", "compare", "polarity"):
        explain_app.command(name)(getattr(explain_cmd, name))
    app.add_typer(explain_app, name="explain")
