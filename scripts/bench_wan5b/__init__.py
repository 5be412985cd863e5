"""Full-size WAN 2.2 TI2V-5B (real config, seeded random bf16 weights): speed and memory of ptq vs bf16 and vs
TensorRT Model Optimizer, every ratio measured in the same run.

Parts (``--part``, comma-separated; default hooks, simfwd, quant_export, modelopt, tiny), one module each:

* ``hooks`` (:mod:`.hooks`): bf16 forward vs the same forward with calibration hooks on the 300 block Linears, at
  1,440 tokens (latent [1,48,9,20,32]) and 27,280 tokens ([1,48,31,44,80]): an empty hook (Python dispatch only),
  naive per-Linear ``x.abs().amax()`` hooks, ``LinearInputObserver`` with the torch and the fused Triton amax path.
* ``simfwd`` (:mod:`.simfwd`): the model after ``quantize_`` (NVFP4 W4A4, FP8 W8A8): the fused CUDA path (Triton
  activation quantization + one GEMM; FP8 via ``torch._scaled_mm`` and via bf16 ``addmm``), and the reference path.
* ``graphs`` (:mod:`.graphs`): what ``ptq run`` does on CUDA: ``CudaGraphForward`` replays of the bf16 forward, of
  the forward with ``LinearInputObserver`` hooks (batched launches; one launch per tensor; GELU tap) and of the
  simulated NVFP4 / FP8 forwards, vs the eager and the graphed bf16 forward; GPU kernel profile; checks that
  replays equal eager outputs and that graphed statistics equal eager ones (``--graphs-hooks-only``: skip the
  quantized part).
* ``amax_kernel`` / ``amax_batch`` (:mod:`.amax`): launch-shape searches for the per-tensor / batched amax kernels
  (cold L2), the fastest is used for the rest of the run.
* ``quant_export``: ``quantize_`` of the 300 block Linears to NVFP4 + ComfyUI export (safetensors write); on the
  GPU with ``simfwd`` (:mod:`.simfwd`), on CPU block by block (:mod:`.cpu_export`).
* ``modelopt`` (:mod:`.vs_modelopt`): ``mtq.quantize(model, NVFP4_DEFAULT_CFG, forward_loop)`` vs ptq (observer +
  ``quantize_``) on the same forward loop (8 forwards at 1,440 tokens): time and peak GPU memory, each on a freshly
  built 5B; and Model Optimizer's fake-quant forward.
* ``ptqmem`` (:mod:`.vs_modelopt`): the ptq half of ``modelopt`` alone (no Model Optimizer needed): calibrate +
  ``quantize_`` on a freshly built 5B, peak and held GPU memory, simulated forward.
* ``gptq`` (:mod:`.gptq_layers`): GPTQ time per 5B layer shape (NVFP4 "mse" / "four_over_six" scales, FP8),
  extrapolated to the 300 block Linears.
* ``gptq_batched``, ``e2e``, ``export``, ``dist`` (:mod:`.scale`): issue 15's scale measurements: batched vs
  per-layer GPTQ on the 300 block Linears, the best recipes end to end on ``--wan5b-dir`` (peak GPU and host
  memory, export + verify time), both exports + verification alone, 1 vs 2 processes.
* ``tiny`` (:mod:`.tiny`): final-latent rel. L2 vs bf16 of Model Optimizer's and ptq's NVFP4 results on the tiny
  WAN model (``ptq/assets/tiny_wan`` if present, else a random tiny model: reported as such); 16 calibration
  prompts x 8 steps with CFG, 16 eval prompts.

:mod:`.common`: settings, timing, inputs, model building, memory; :mod:`.report`: the table printed at the end;
``__main__``: the command line. Results: ``--out``/``bench_wan5b.json``.

Timing: warm-up, then interleaved rounds (every variant once per round), synchronize + perf_counter around each
forward, medians. Peak memory: ``torch.cuda.max_memory_allocated`` (GiB = 2**30 bytes). ``--smoke``: the GPU flow
on CPU with a 2-block model and tiny inputs (checks the script, not speed).

    PYTHONPATH=. python scripts/bench_wan5b.py --out /tmp/bench             # GPU, all parts
    PYTHONPATH=. python scripts/bench_wan5b.py --device cpu --part quant_export
    PYTHONPATH=. python scripts/bench_wan5b.py --smoke --part hooks,simfwd,graphs
"""
