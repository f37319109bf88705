"""JobState folds events with a pure reducer."""
from qlora.events import EvalLoss, Failed, Finished, JobState, Log, Progress, Started, Stopped


def _progress(step, loss=1.0):
    return Progress(step=step, total_steps=10, loss=loss, learning_rate=1e-4, tokens_per_s=100.0,
                    elapsed_s=step * 2.0, eta_s=(10 - step) * 2.0)


def test_a_run_folds_into_state_without_mutating():
    s0 = JobState()
    s1 = s0.apply(Started(run_dir="r", total_steps=10, base_model="m", dataset="d"))
    assert s0.status == "idle" and s1.status == "running" and s1.active
    s2 = s1.apply(_progress(1, 2.0)).apply(_progress(2, 1.5)).apply(EvalLoss(2, 1.7)).apply(Log("hello"))
    assert s2.step == 2 and s2.fraction == 0.2 and s2.losses == ((1, 2.0), (2, 1.5)) and s2.eval_losses == ((2, 1.7),)
    assert s2.logs[-1] == "hello" and "step 2/10" in s2.summary()
    done = s2.apply(Finished("r", {"final_loss": 1.5}))
    assert done.status == "finished" and not done.active and done.metrics["final_loss"] == 1.5


def test_failed_keeps_last_progress_and_stopped_has_step():
    s = JobState().apply(Started("r", 10, "m", "d")).apply(_progress(3))
    failed = s.apply(Failed("out of GPU memory", "lower batch_size"))
    assert failed.status == "failed" and failed.step == 3 and "lower batch_size" in failed.summary()
    stopped = s.apply(Stopped("r", 3, {}))
    assert stopped.status == "stopped" and stopped.step == 3


def test_log_tail_is_bounded():
    s = JobState()
    for i in range(500):
        s = s.apply(Log(str(i)))
    assert len(s.logs) == 200 and s.logs[-1] == "499"


def test_summary_names_only_what_is_known_of_the_current_job():
    import time

    loading = JobState(status="starting", base_model="m", dataset="d")
    assert loading.summary() == "starting: m on d, loading"  # no start time known: nothing, never a "?"
    at = time.mktime((2026, 1, 2, 9, 5, 0, 0, 0, -1))
    clicked = JobState(status="starting", base_model="m", dataset="d", started_at=at)
    assert clicked.summary() == "starting: m on d, loading, started 09:05"
    running = clicked.apply(Started("r", 10, "m", "d", at=at + 60)).apply(_progress(2))
    assert running.started_at == at and running.summary() == "running: m on d, step 2/10, started 09:05"
    done = running.apply(Finished("r", {}))
    assert "started" not in done.summary() and done.summary().startswith("finished at step 2/10")


def test_progress_rates_leave_out_the_first_steps_one_time_work(monkeypatch):
    """The first step carries the card's warm-up and, on a compute-poor card, the compile of the fused layers'
    kernels: the ETA and tokens/s come from the steps after it, so a 30 s compile does not stretch the ETA."""
    import threading
    from types import SimpleNamespace

    from qlora import callbacks

    clock = [100.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    events = []
    cb = callbacks.EventCallback(events.append, threading.Event(), "r", "m", "d")
    state = SimpleNamespace(global_step=0, max_steps=101, num_input_tokens_seen=0)
    cb.on_train_begin(None, state, None)
    for step, seconds in [(1, 32.0)] + [(k, 2.0) for k in range(2, 11)]:  # 30 s of compile, then 2 s a step
        clock[0] += seconds
        state.global_step, state.num_input_tokens_seen = step, step * 1000
        cb.on_step_end(None, state, SimpleNamespace(should_training_stop=False))
        cb.on_log(None, state, None, logs={"loss": 1.0})
    first, last = [e for e in events if isinstance(e, Progress)][::9]
    assert first.step == 1 and first.eta_s == 32.0 * 100  # one step seen: nothing better to go on
    assert last.step == 10 and last.eta_s == 2.0 * 91 and last.tokens_per_s == 500.0
    assert last.elapsed_s == 32.0 + 9 * 2.0  # elapsed is the whole run's
    # a run resumed at step 40: its first step here is 41, and the rates count this session's steps only
    events.clear()
    clock[0] += 100.0
    state.global_step = 40
    cb.on_train_begin(None, state, None)
    for step in (41, 42, 43):
        clock[0] += 30.0 if step == 41 else 2.0
        state.global_step = step
        cb.on_step_end(None, state, SimpleNamespace(should_training_stop=False))
        cb.on_log(None, state, None, logs={"loss": 1.0})
    assert [e.eta_s for e in events if isinstance(e, Progress)] == [30.0 * 60, 2.0 * 59, 2.0 * 58]
