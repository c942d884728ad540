"""Option values of `export-quantized` that come from the export side (torch, onnx)."""

from stepquant.bundle.targets import TARGETS
from stepquant.calibrators.calibrate import CALIBRATORS
from stepquant.cli.choices import choices
from stepquant.export.precision import PRECISIONS
from stepquant.models.device import DTYPES
from stepquant.quant.spec import FORMATS

Calibrator = choices("Calibrator", CALIBRATORS)
Format = choices("Format", FORMATS)
Target = choices("Target", TARGETS)
Precision = choices("Precision", PRECISIONS)
FpDtype = choices("FpDtype", DTYPES)
