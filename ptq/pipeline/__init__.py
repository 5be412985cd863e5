"""Pipeline stages of a quantization job (encode, baseline, calibrate, quantize, evaluate, export, report) and the
job that chains them (``ptq.pipeline.job``)."""
