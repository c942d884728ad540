"""The export's five stages, one at a time, into a staged directory renamed into place at the end."""

import os
import shutil
import sys
import time
from pathlib import Path

from stepquant.export.bundle import staged_directory
from stepquant.export.config import CalibrationConfig, ChecksConfig
from stepquant.pipeline import (
    CALIBRATION_SHARDS,
    ExportConfig,
    calibrate_model,
    export_graphs,
    measure_quality,
    prepare,
    write_bundle,
)
from stepquant.runtime import SamplerConfig

fast = bool(os.environ.get("FAST"))
out = Path(os.environ.get("OUT", "out/examples")) / "stages"
config = ExportConfig(
    model="demo-digits",
    out=out,
    overwrite=True,
    progress=False,
    **(
        dict(
            sampler=SamplerConfig(steps=4),
            calibration=CalibrationConfig(samples=4),
            checks=ChecksConfig(eval_samples=4),
        )
        if fast
        else {}
    ),
)
start = time.perf_counter()
prepared = prepare(config)
print(f"prepare: sample shape {prepared.shape}")
with staged_directory(config.out, config.overwrite, prepared.protected) as staging:
    calibrated = calibrate_model(config, prepared, start, staging / CALIBRATION_SHARDS)
    print(f"calibrate_model: {len(calibrated.layer_names)} quantized layers")
    exported = export_graphs(config, prepared, calibrated, staging)
    shutil.rmtree(staging / CALIBRATION_SHARDS)
    print(f"export_graphs: FP graph parity {'PASS' if exported.fp_parity.passed else 'FAIL'}")
    measured = measure_quality(config, prepared, calibrated, exported, staging)
    print(f"measure_quality: PSNR to FP {measured.reports['tensorrt'].psnr_mean_db:.2f} dB")
    write_bundle(config, prepared, calibrated, exported, measured, staging)
print(f"write_bundle: {out}")
sys.exit(0)
