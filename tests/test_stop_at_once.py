"""A second Ctrl-C stops a distillation at once and still prints the command that resumes it."""
import os
import re
import signal
import subprocess
import sys
import time

from ld3m_fast.distill.run import CHECKPOINT

from _workspace import assert_one_line_error, checkpoint_iteration, cli_process, distill_flags, make_workspace


def test_a_second_ctrl_c_stops_at_once_and_names_the_intact_checkpoint(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    run = tmp_path / "run"
    # 40 chain steps: an iteration lasts long enough for the second signal to land inside it.
    args = distill_flags(ws, run, "--iterations", 10_000, "--steps", 40, "--save-every", 1)
    child = subprocess.Popen([sys.executable, "-m", "ld3m_fast.cli.main", *args], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    try:
        while not (run / "metrics.jsonl").is_file():  # no deadline: a busy machine is only slower
            assert child.poll() is None, child.communicate()
            time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        for line in child.stdout:  # the first Ctrl-C was seen: a second one stops at once
            if "finishing iteration" in line:
                break
        child.send_signal(signal.SIGINT)
        _, err = child.communicate()
    finally:
        if child.poll() is None:
            child.kill()
    line = assert_one_line_error(child.returncode, err, "SIGINT again after", "stopped at once",
                                 "is intact", "Resume with: ld3m-fast distill --resume", exit_code=130)
    kept = checkpoint_iteration(run)
    done = int(re.search(r"after (\d+) of 10000 iterations", line).group(1))
    assert f"The checkpoint of iteration {kept} in {run / CHECKPOINT} is intact" in line
    # Every iteration is checkpointed: at most the one whose checkpoint the signal cut short is lost.
    assert done - 1 <= kept <= done
    # The printed command resumes the run (with a nearer end, so the test stays short).
    command = line.split("Resume with: ")[1].split()
    result = cli_process(*command[1:], "--iterations", kept + 1, "--steps", 40)
    assert result.returncode == 0, result.stderr[-2000:]
    assert checkpoint_iteration(run) == kept + 1
