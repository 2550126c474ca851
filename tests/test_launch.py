"""tests/launch.py: a command that outlives its timeout fails the test with the stack of every process it started."""
import pathlib

import pytest

from tests.launch import ROOT, launch


def test_a_torchrun_launch_that_hangs_fails_with_the_stack_of_torchrun_and_of_each_worker(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\n\ndef wait_forever():\n    time.sleep(1000)\n\nwait_forever()\n")
    cores = set(pathlib.Path(ROOT).glob("core*"))
    with pytest.raises(pytest.fail.Exception) as failure:
        launch(str(script), [], nproc=2, timeout=20)
    message = str(failure.value)
    assert "still running after 20 s" in message, message
    assert message.count("Fatal Python error: Aborted") == 3, message  # torchrun and its 2 workers, from faulthandler
    assert message.count("in wait_forever") == 2, message             # where each worker was
    assert set(pathlib.Path(ROOT).glob("core*")) == cores, "SIGABRT left a core file"  # they run in ROOT
