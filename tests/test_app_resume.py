"""The app's Resume button: a run cut short by a crash continues from its last checkpoint, through the real server."""
import json
import shutil
import threading

from qlora import runs
from qlora.events import Progress
from qlora.train import train

from apphelpers import launch, wait_for


def test_an_interrupted_run_resumes_from_its_checkpoint_through_the_api(tiny_cfg, tmp_path):
    # a run that checkpointed at step 2, then "crashed": run.json still says running, for a process that is gone
    stop = threading.Event()
    cfg = tiny_cfg(max_steps=6, save_steps=2, run_name="crashed", output_dir=str(tmp_path / "runs"))
    run_dir = train(cfg, lambda e: stop.set() if isinstance(e, Progress) and e.step == 3 else None, stop)
    shutil.rmtree(run_dir / "adapter")
    meta = json.loads((run_dir / "run.json").read_text())
    meta.update(status="running", pid=2**22 + 12345, boot="gone")
    runs.write_json(run_dir / "run.json", meta)
    assert runs.list_runs(tmp_path / "runs")[0].status == "interrupted"
    checkpoint_step = int(runs.latest_checkpoint(run_dir).name.split("-")[-1])
    assert 2 <= checkpoint_step < 6

    demo, client = launch(tmp_path / "runs", admin_password="pw")
    try:
        assert "Only the admin" in client.predict(run="crashed", api_name="/resume")
        assert "only a run whose process died" in client.predict(run="nope", admin_password="pw", api_name="/resume")
        for outside in ("../crashed", "..", ".", "/etc"):  # a run name never reaches past the runs folder
            assert "only a run whose process died" in client.predict(run=outside, admin_password="pw",
                                                                     api_name="/resume")
        message = client.predict(run="crashed", admin_password="pw", api_name="/resume")
        assert "Resuming crashed" in message, message
        status = wait_for(client, lambda s: s["status"] in ("finished", "failed"), timeout=120)
        assert status["status"] == "finished", status
        assert status["step"] == 6
        assert status["losses"][0][0] == checkpoint_step + 1  # continued after its checkpoint, not from step 0
    finally:
        demo.close()
    [info] = runs.list_runs(tmp_path / "runs")
    assert info.usable and info.status == "finished" and info.step == 6
