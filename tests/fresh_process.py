"""Run checkpoints in a fresh Python process with plain transformers (trust_remote_code=True).

Usage: python fresh_process.py JOBS_JSON OUT_PT
JOBS_JSON: [{"checkpoint": DIR, "ids": [[...]], "new_tokens": N}, ...]; OUT_PT gets one result
per job: {"logits", "generated", "class", "module"}. One process serves many checkpoints, so the
interpreter start-up and imports are paid once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch


def run_many_in_fresh_process(jobs: list[dict], workdir: Path) -> list[dict]:
    jobs_path = workdir / "jobs.json"
    out_path = workdir / "out.pt"
    jobs_path.write_text(json.dumps([{**j, "checkpoint": str(j["checkpoint"])} for j in jobs]))
    proc = subprocess.run(
        [sys.executable, __file__, str(jobs_path), str(out_path)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out_path)


def run_in_fresh_process(checkpoint: Path, ids: list[list[int]], workdir: Path, new_tokens: int = 20) -> dict:
    return run_many_in_fresh_process(
        [{"checkpoint": checkpoint, "ids": ids, "new_tokens": new_tokens}], workdir
    )[0]


def main() -> None:
    from transformers import AutoModelForCausalLM

    jobs = json.loads(Path(sys.argv[1]).read_text())
    assert "puzzle" not in sys.modules
    results = []
    for job in jobs:
        model = AutoModelForCausalLM.from_pretrained(
            job["checkpoint"], trust_remote_code=True, dtype=torch.float32
        )
        model.eval()
        ids = torch.tensor(job["ids"])
        n = job.get("new_tokens", 20)
        with torch.no_grad():
            logits = model(ids).logits
            generated = model.generate(ids[:1], max_new_tokens=n, do_sample=False, min_new_tokens=n)
        results.append(
            {
                "logits": logits,
                "generated": generated,
                "class": type(model).__name__,
                "module": type(model).__module__,
            }
        )
    torch.save(results, sys.argv[2])


if __name__ == "__main__":
    main()
