#!/usr/bin/env bash
# Full-size WAN family runs on one GPU with seeded random weights from the real configs (docs/wan_family.md,
# "GPU measurements"); each step's report.json, log and a summary line land in $BENCH_OUT (default $WORK/out: a
# chain that outlives one device call must not write into that call's $OUT, which the next call replaces).
#
#   bash scripts/bench_wan_family.sh gen a14b_offload a14b w14 mixed5b
#
# Steps (in the order given):
#   tiny_offload  the shipped two-expert tiny model with model.offload=true (a quick check of the offload path)
#   gen           WAN 2.1 T2V 14B folder, and a T2V-A14B folder hard-linked to it (both experts share the 14B's
#                 random weights; ~40 GB of disk for both models instead of ~109 GB)
#   a14b          config=wan22_a14b_t2v_nvfp4 at the preset's settings (16 prompts x 8 steps at 480x832x33 with
#                 CFG), 2 evaluation prompts; both export targets when $WORK's disk or /dev/shm holds them
#   a14b_offload  the same with model.offload=true (2 calibration prompts, 1 evaluation prompt), ComfyUI files
#   a14b_offload_preset  model.offload=true at the preset's settings (16 prompts x 8 steps), 2 evaluation prompts,
#                 ComfyUI files
#   w14           config=wan21_t2v_14b_nvfp4 at the preset's settings
#   mixed5b       TI2V-5B, quant=nvfp4_mixed (2 calibration prompts, host Hessians)
# eval.runtimes=[] everywhere (each runtime is another evaluation pass at full size).
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/wanfam}
OUT=${BENCH_OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1

free_gb() { df --output=avail -B1G "$1" 2>/dev/null | tail -1 | tr -d ' '; }

# run NAME RUN_DIR ARGS...: one `ptq run`; its wall time, peak RSS and report figures as a line of $OUT/summary.jsonl
run() {
    local name=$1 dir=$2
    shift 2
    rm -rf "$dir"
    python - "$name" "$dir" "$OUT" "$WORK" "$@" <<'EOF'
import json, resource, subprocess, sys, time
name, run_dir, out, work, *args = sys.argv[1:]
cmd = [sys.executable, "-m", "ptq", "run", *args, f"hydra.run.dir={run_dir}", "progress=false",
       f"eval.cache_dir={work}/cache"]
t0 = time.perf_counter()
with open(f"{out}/{name}.log", "w") as log:
    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
wall = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
line = {"step": name, "rc": rc, "wall_s": round(wall, 1), "max_rss_gib": round(rss, 2), "args": args}
try:
    rep = json.load(open(f"{run_dir}/report.json"))
    json.dump(rep, open(f"{out}/{name}_report.json", "w"), indent=1)
    line.update(peak_gpu_gib=rep["run"].get("peak_gpu_gib"), by_phase=rep["run"].get("peak_gpu_gib_by_phase"),
                timings_s=rep.get("timings_s"),
                exports=[(e["target"], e.get("path", "").rsplit("/", 1)[-1], e["bytes"], e["verified"])
                         for e in rep.get("exports", [])])
except (OSError, KeyError, ValueError) as exc:
    line["report"] = f"none ({exc})"
print(json.dumps(line), flush=True)
open(f"{out}/summary.jsonl", "a").write(json.dumps(line) + "\n")
EOF
    # the exports are verified by the run; drop them so the next step has the disk
    find "$dir" -name '*.safetensors' -size +64M -delete 2>/dev/null
}

for step in "$@"; do
    echo "== $step $(date +%T) disk ${WORK}: $(free_gb "$WORK") GB free, /dev/shm: $(free_gb /dev/shm) GB free"
    case $step in
    gen)
        python scripts/make_random_wan.py --model wan21_t2v_14b --out "$WORK/w14"
        python scripts/make_random_wan.py --model wan22_t2v_a14b --out "$WORK/a14b" --link-from "$WORK/w14" \
            --experts-share-weights
        ;;
    a14b)
        # 2 experts x 2 targets x ~7.9 GB of NVFP4 files
        dir=$WORK/run_a14b targets="[comfyui,diffusers]"
        if [ "$(free_gb "$WORK")" -lt 36 ]; then
            if [ "$(free_gb /dev/shm)" -ge 36 ]; then dir=/dev/shm/run_a14b; else targets="[comfyui]"; fi
        fi
        run a14b "$dir" config=wan22_a14b_t2v_nvfp4 model.path="$WORK/a14b" eval.num_prompts=2 \
            eval.runtimes=[] "export.targets=$targets"
        rm -rf /dev/shm/run_a14b
        ;;
    tiny_offload)
        run tiny_offload "$WORK/run_tiny_offload" config=tiny_moe_nvfp4 model.offload=true eval.runtimes=[]
        ;;
    a14b_offload)
        run a14b_offload "$WORK/run_a14b_offload" config=wan22_a14b_t2v_nvfp4 model.path="$WORK/a14b" \
            model.offload=true calib.num_prompts=2 eval.num_prompts=1 eval.runtimes=[] "export.targets=[comfyui]"
        ;;
    a14b_offload_preset)
        run a14b_offload_preset "$WORK/run_a14b_offload_preset" config=wan22_a14b_t2v_nvfp4 \
            model.path="$WORK/a14b" model.offload=true eval.num_prompts=2 eval.runtimes=[] "export.targets=[comfyui]"
        ;;
    w14)
        run w14 "$WORK/run_w14" config=wan21_t2v_14b_nvfp4 model.path="$WORK/w14" eval.runtimes=[]
        ;;
    mixed5b)
        # ~21 GB of random 5B (the 14B folders may still be on the disk: then in /dev/shm)
        w5=$WORK/wan5b
        if [ ! -d "$w5" ] && [ "$(free_gb "$WORK")" -lt 30 ]; then w5=/dev/shm/wan5b; fi
        [ -d "$w5" ] || python scripts/make_random_wan5b.py --out "$w5"
        run mixed5b "$WORK/run_mixed5b" config=wan_nvfp4 quant=nvfp4_mixed model.path="$w5" \
            calib.num_prompts=2 eval.num_prompts=2 eval.runtimes=[] calib.hessian_storage=host \
            quant.weight.batch_gib=4 calib.checkpoint_every=0 quant.mixed.sensitivity_inputs=1
        ;;
    *) echo "unknown step $step" >&2 ;;
    esac
done
echo "== done $(date +%T)"
