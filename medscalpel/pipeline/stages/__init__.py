"""The registered stages of a run, one module per concept; importing this package registers
them with :data:`medscalpel.pipeline.stage.STAGES`."""

from medscalpel.pipeline.stages import (audit, calibration, compress, data, explain,  # noqa: F401
                                        imports, model, predict, repair, report, scale)
