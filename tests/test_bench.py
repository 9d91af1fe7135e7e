"""The GPU benchmark's own smoke run on CPU (tiny random weights, 1 s of speech): the same code
path as on the H200, so a change that breaks `bench/bench.py` or the CPU profile probe fails here.

It checks what the JSON reports are for: W1 runs whose frame counts, stages and output agree
with the media, per-model timings, the landmark figures and the commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"decode", "landmarks", "latents", "audio", "generate", "blend", "encode"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["MUSETALK_AVATAR_CACHE"] = ""
    return env


def _probe(script: str, out: Path, *args: str) -> dict:
    """``bench/probes/<script>`` on the CPU with ``args``; its JSON report from ``--out``."""
    cmd = [sys.executable, str(ROOT / "bench" / "probes" / script), "--device", "cpu", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    return {"media": root / "media", "models": root / "models", "work": root / "work", "out": root / "bench.json"}


@pytest.fixture(scope="module")
def report(bench_dirs: dict[str, Path]) -> dict:
    d = bench_dirs
    cmd = [
        sys.executable, str(ROOT / "bench" / "bench.py"), "--device", "cpu", "--size", "tiny", "--audio-seconds", "1",
        "--media", str(d["media"]), "--models", str(d["models"]), "--work", str(d["work"]), "--out", str(d["out"]),
        "--avatar-cache", "0", "--masks-compare", "0", "--baseline", "0", "--memory-batches", "--encoder-micro", "0",
        "--cudnn-compare", "0", "--channels-last", "0", "--fast-preset", "", "--landmark-batches", "4",
        "--skip-ceilings", "--commit", "test-commit", "--decode-threads", "2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(d["out"].read_text())


def test_bench_smoke_reports_w1_runs_that_match_their_output(report: dict) -> None:
    assert report["commit"] == "test-commit" and report["weights"] == "random, tiny"
    assert report["media"]["faces"] > 0  # the boxes file found faces in the benchmark video
    for name in ("cold", "warm"):
        run = report["w1"][name]
        assert run["frames"] == 25  # 1 s of speech at 25 fps
        probe = run["output_probe"]
        assert probe["n_frames"] == run["frames"] and probe["has_audio"] and probe["video_codec"] == "h264"
        assert set(run["stage_seconds"]) == STAGES and all(v >= 0 for v in run["stage_seconds"].values())
        assert run["wall_s"] > 0 and abs(run["output_fps"] - run["frames"] / run["wall_s"]) < 0.2
        assert run["output_bytes"] > 1000
        assert run["detail"]["output_frames"] == run["frames"] and "masks_wait_s" in run["detail"]
    # The decode-first "before" of the streamed decode ran beside it and wrote the same bytes.
    compare = report["stream_decode_compare"]["default_preset"]
    assert compare["same_output"] and set(compare["median_wall_s"]) == {"streamed", "decode_first"}
    assert report["frame_copy_compare"]["default_preset"]["same_output"]
    # W1 detecting its faces with DWPose's real network (boxes recognised from the boxes file):
    # the boxes file's output, whichever way the batches ran.
    dw = report["dwpose_compare"]["default_preset"]
    assert dw["same_output"] and set(dw["median_wall_s"]) == {"dwpose_after", "dwpose_before"}
    first = report["w1"]["dwpose_before_first_job"]
    assert first["stage_seconds"]["landmarks"] > 0 and first["options"]["landmarks"] == "dwpose"
    assert first["output_sha256"] == report["w1"]["warm_dwpose_after_r0"]["output_sha256"]
    assert first["frames_with_face"] == report["w1"]["warm"]["frames_with_face"]
    # The decode on another number of conversion threads: the same frames, so the same bytes.
    assert report["decode_threads_compare"]["default_preset"]["same_output"]
    assert all(len(v) == 3 for v in report["decode_threads"]["read_frames_s"].values())
    for variant in ("after", "before"):
        pair = [report["w1"][f"new_length_{variant}_{k}"] for k in ("first", "second")]
        assert pair[0]["frames"] == pair[1]["frames"] == 25 and pair[0]["output_sha256"] == pair[1]["output_sha256"]
        assert pair[0]["options"]["landmarks"] == "dwpose" and pair[0]["frames_with_face"] == 25


def test_bench_smoke_times_each_model_and_the_landmarks(report: dict) -> None:
    micro = report["micro"]
    assert micro["unet_ms_per_frame"] > 0 and micro["vae_decode_ms_per_frame"] > 0
    # The engine's encoder call size (2 crops = 4 images on CPU) is timed beside the whole batch.
    assert micro["vae_encode_calls4_ms_per_input_frame"] > 0
    assert report["landmarks"]["cascade"]["batch_4"]["faces"] > 0


def test_dwpose_probe_times_the_detector_per_batch_size(bench_dirs: dict[str, Path], report: dict, tmp_path: Path) -> None:
    out = tmp_path / "dwpose.json"
    cmd = [
        sys.executable, str(ROOT / "bench" / "probes" / "dwpose_probe.py"), "--device", "cpu", "--size", "tiny",
        "--media", str(bench_dirs["media"]), "--frames", "6", "--batches", "2", "4", "--variant-batch", "4",
        "--out", str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["frames"] == 6 and d["warp_ms_per_frame"] > 0
    for bs in (2, 4):  # a first and a second pass over the frames, and one forward pass alone
        det = d["detector"][f"batch_{bs}"]
        assert len(det["fps"]) == 2 and all(v > 0 for v in det["fps"])
        assert d["forward"][f"batch_{bs}"]["forward_ms"] > 0 and d["forward"][f"batch_{bs}"]["network_ms"] > 0


def test_cpu_profile_probe_accounts_cpu_per_thread(bench_dirs: dict[str, Path], report: dict, tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    cmd = [
        sys.executable, str(ROOT / "bench" / "probes" / "cpu_profile.py"), "--device", "cpu", "--presets", "veryfast",
        "--models", str(bench_dirs["models"]), "--media", str(bench_dirs["media"]), "--work", str(tmp_path / "w"),
        "--out", str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = json.loads(out.read_text())["runs"]["veryfast"]
    cpu = run["cpu"]
    assert run["frames"] == 25 and cpu["job_cores_busy"] > 0
    assert cpu["cpu_s_by_thread"].get("MainThread", 0) > 0
    assert cpu["timeline_cores"] and all(len(p) == 2 for p in cpu["timeline_cores"])


def test_gpu_floor_captures_every_op_of_a_compiled_model_and_prices_it() -> None:
    """The op floor counts the same convs/linears/attentions whether the model is compiled or not
    (compiled code calls no module hooks), and each op's FLOPs follow its shape."""
    import importlib

    import torch

    sys.path.insert(0, str(ROOT / "bench" / "probes"))
    try:
        gpu_floor = importlib.import_module("gpu_floor")
    finally:
        sys.path.remove(str(ROOT / "bench" / "probes"))
    from musetalk_job import compiled

    cpu = torch.device("cpu")
    m = gpu_floor.build_models("tiny", cpu, torch.float32)

    def counts() -> dict[str, dict]:
        calls = gpu_floor.model_calls(m, cpu, torch.float32, 4, 2, 2)
        return {k: gpu_floor.capture_ops(mod, calls[k][0]).counts for k, mod in (("unet", m.unet), ("vae_decode", m.vae))}

    eager = counts()
    assert compiled.enable(m, "regional", backend="eager")
    try:
        compiled.warmup(m, [4], decode_chunk=2)
        assert counts() == eager
    finally:
        compiled.disable(m)
        torch._dynamo.reset()
    kinds = {key.kind for key in eager["unet"]}
    assert kinds == {"conv", "linear", "sdpa"}
    conv = gpu_floor.OpKey("conv", ((2, 4, 8, 8), 6, (3, 3), (1, 1), (1, 1), 1, True))
    assert gpu_floor.op_flops(conv) == 2 * 2 * 8 * 8 * 6 * 4 * 9
    attn = gpu_floor.OpKey("sdpa", ((2, 3, 16, 8), (2, 3, 5, 8), (2, 3, 5, 8), True, False))
    assert gpu_floor.op_flops(attn) == 2 * (2 * 2 * 3 * 16 * 5 * 8)
    floor = gpu_floor.op_floor("vae_decode", m.vae, lambda: m.vae.decode(torch.randn(2, 4, 32, 32)).sample, cpu,
                               torch.float32, 2, None)
    assert floor["op_floor_ms_per_frame"] > 0 and floor["distinct_ops"] == len(eager["vae_decode"])


def test_gpu_timeline_busy_idle_and_streams_from_a_trace() -> None:
    import importlib

    sys.path.insert(0, str(ROOT / "bench" / "probes"))
    try:
        tl = importlib.import_module("gpu_timeline")
    finally:
        sys.path.remove(str(ROOT / "bench" / "probes"))
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "conv", "ts": 0, "dur": 100, "args": {"stream": 7}},
        {"ph": "X", "cat": "kernel", "name": "conv", "ts": 50, "dur": 100, "args": {"stream": 13}},  # overlaps
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1150, "dur": 50, "args": {"stream": 7}},  # 1 ms gap
        {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "ts": 0, "dur": 5000},  # host side: not counted
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 1205, "dur": 5, "args": {"stream": 7}},  # 5 us gap
    ]}
    s = tl.summarize(tl.kernel_events(trace))
    assert s["window_s"] == 0.00121 and s["busy_s"] == 0.000205 and s["idle_s"] == 0.001005
    assert s["idle_gaps_count"]["1-10ms"] == 1 and s["idle_gaps_count"]["<10us"] == 1
    assert s["streams"]["7"]["events"] == 3 and s["streams"]["13"]["seconds"] == 0.0001
    assert s["top_kernels"][0] == {"name": "conv", "calls": 2, "seconds": 0.0002}
    assert s["busy_per_100ms"] == [0.002]  # the whole 1.21 ms window falls in the first 100 ms bin
    # 150 µs busy in the first 100 µs bin, none in the next, 50 of the third's 100 µs, split at bin edges
    assert tl.busy_per_bin([(0, 100), (50, 150), (250, 300)], 0, 300, width=100) == [1.0, 0.5, 0.5, 0.0]


def test_first_job_probe_compares_start_ups_with_and_without_the_warm_up_job(bench_dirs: dict[str, Path], report: dict,
                                                                             tmp_path: Path) -> None:
    d = _probe("first_job.py", tmp_path / "first.json", "--size", "tiny", "--models-dir", str(bench_dirs["models"]),
               "--media", str(bench_dirs["media"]), "--rounds", "1", "--jobs", "2", "--frames", "2",
               "--warmup-seconds", "0.2", "--preset", "ultrafast")
    assert d["same_bytes"]  # the warm-up job changes nothing a job writes
    assert d["runs"]["warmup"][0]["warmup_job_s"] == 0 and d["runs"]["job"][0]["warmup_job_s"] > 0
    for variant in ("warmup", "job"):
        jobs = d["runs"][variant][0]["jobs"]
        assert len(jobs) == 2 and all(j["frames"] == 2 and j["wall_s"] > 0 for j in jobs)
        assert d["summary"][variant]["first_job_median_s"] == jobs[0]["wall_s"]


def test_worker_start_probe_starts_the_real_worker_and_posts_jobs(bench_dirs: dict[str, Path], report: dict,
                                                                  tmp_path: Path) -> None:
    d = _probe("worker_start.py", tmp_path / "worker.json", "--size", "tiny", "--models-dir", str(bench_dirs["models"]),
               "--media", str(bench_dirs["media"]), "--jobs", "1", "--audio-seconds", "0.5", "--preset", "ultrafast",
               "--work", str(tmp_path / "w"))
    assert d["spawn_to_started_s"] > 0 and d["exit_code"] == 143  # stopped by SIGTERM, as a node is
    job = d["jobs"][0]
    assert job["status"] == 200 and job["exit_code"] == 0 and job["stage_seconds"]["generate"] > 0
    assert (tmp_path / "w" / "out0.mp4").stat().st_size > 0
    assert any("models loaded" in line for _, line in d["log"])


def test_encoder_w1_probe_times_the_first_frame_per_variant(bench_dirs: dict[str, Path], report: dict, tmp_path: Path) -> None:
    d = _probe("encoder_w1.py", tmp_path / "enc.json", "--device", "cpu", "--size", "tiny", "--models", str(bench_dirs["models"]),
               "--media", str(bench_dirs["media"]), "--rounds", "1", "--audio-seconds", "0.3", "--preset", "ultrafast",
               "--variant", "default:", "--variant", "late_mel:early_log_mel=false", "--variant", "fast:preset=veryfast")
    assert d["variants"] == {"default": {}, "late_mel": {"early_log_mel": "False"}, "fast": {"preset": "veryfast"}}
    assert set(d["runs"]) == {f"{k}|{v}" for k in ("new", "repeat") for v in ("default", "late_mel", "fast")}
    for key, runs in d["runs"].items():
        r = runs[0]
        assert 0 < r["first_frame_s"] <= r["last_frame_s"] < r["wall_s"] and r["tail_s"] > 0, key
        assert r["stage_seconds"]["latents"] == 0 if key.startswith("repeat") else r["stage_seconds"]["latents"] > 0
    # the switch changes no byte of the output; another preset (a job option) does
    assert len({h for k, s in d["summary"].items() if not k.endswith("|fast") for h in s["hashes"]}) == 1
    assert set(d["summary"]["new|fast"]["hashes"]).isdisjoint(d["summary"]["new|default"]["hashes"])
    assert all(s["output_bytes"] > 0 for s in d["summary"].values())


def test_upsample_probe_times_each_fold_and_its_pixel_difference(bench_dirs: dict[str, Path], report: dict, tmp_path: Path) -> None:
    d = _probe("upsample_probe.py", tmp_path / "up.json", "--device", "cpu", "--size", "tiny", "--models", str(bench_dirs["models"]),
               "--media", str(bench_dirs["media"]), "--compile", "", "--batch", "2", "--iters", "1", "--repeats", "1",
               "--modes", "off,transpose,phases,off")
    assert set(d["results"]) == {"eager|off", "eager|transpose", "eager|phases", "eager|off#3"}
    assert d["foldable"]["unet"] >= 1 and d["foldable"]["vae"] >= 1
    for key, r in d["results"].items():
        assert r["unet_ms_per_frame"] > 0 and r["decode_ms_per_frame"] > 0 and r["face_step_ms_per_frame"] > 0, key
        assert r["faces_vs_off"]["max"] <= 1, key  # fp32: the folds change rounding only
    assert d["results"]["eager|off#3"]["faces_vs_off"] == {"max": 0, "share_differing": 0.0, "mean": 0.0}  # unfolded = the first
    assert d["ops"] and all(set(v) >= {"off_ms", "transpose_ms", "phases_ms"} for v in d["ops"].values())


def test_kernel_probe_times_the_gpu_steps_per_chunk(bench_dirs: dict[str, Path], report: dict, tmp_path: Path) -> None:
    d = _probe("kernel_probe.py", tmp_path / "k.json", "--device", "cpu", "--size", "tiny", "--models", str(bench_dirs["models"]),
               "--media", str(bench_dirs["media"]), "--chunks", "2,4", "--batch", "4", "--reps", "1",
               "--save-faces", str(tmp_path / "faces"))
    assert d["cudnn_benchmark"] is False and [r["chunk"] for r in d["chunks"]] == [2, 4]
    for r in d["chunks"]:
        assert r["face_ms_per_frame"] > 0 and r["encode_ms_per_crop"] > 0 and r["parse_ms_per_image"] > 0, r
        assert r["face_diff_vs_first"] == 0  # on the CPU the chunk is the whole batch: the same call
    cmp = subprocess.run([sys.executable, str(ROOT / "bench" / "probes" / "kernel_probe.py"), "--compare",
                          str(tmp_path / "faces" / "faces-2.npy"), str(tmp_path / "faces" / "faces-4.npy")],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, check=True)
    assert json.loads(cmp.stdout) == {"max_diff": 0, "share_differing": 0.0, "pixels": 4 * 256 * 256 * 3}


def test_floors_count_the_encode_in_generate_only_when_it_ran_in_the_loop() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench as bench_mod
    finally:
        sys.path.remove(str(ROOT / "bench"))
    ceil = {"matmul_fp16_8192_tflops": 500.0}
    mic = {"unet_tflops": 300.0, "vae_decode_tflops": 300.0, "vae_encode_tflops": 300.0}

    def run(latents_s: float, in_loop: bool) -> dict:
        return {"frames": 750, "frames_with_face": 250, "detail": {"latents_in_loop": in_loop},
                "stage_seconds": {"generate": 1.5, "latents": latents_s}}

    up_front = bench_mod.floors(run(0.4, False), ceil, mic)
    in_loop = bench_mod.floors(run(0.001, True), ceil, mic)
    cache_hit = bench_mod.floors(run(0.0, False), ceil, mic)  # nothing encoded at all
    enc = up_front["latents_floor_s"]
    assert enc > 0 and up_front["latents_s"] == 0.4
    assert in_loop["generate_s"] == 1.501 and in_loop["latents_s"] == 0.0
    assert in_loop["generate_floor_s"] == pytest.approx(up_front["generate_floor_s"] + enc, abs=2e-3)
    assert cache_hit["generate_floor_s"] == up_front["generate_floor_s"]
