"""The registered stages of a run, one module per concept; importing this package registers
them with :data:`medscalpel.pipeline.stage.STAGES`."""

from medscalpel.pipeline.stages import (audit, compress, data, explain, model, repair,  # noqa: F401
                                        report)
