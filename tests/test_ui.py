"""The Prefect UI of the local stack in headless Chromium (Debian's `chromium`, driven by Playwright's
Python package; no browser download): the finetune/nightly deployment with its next scheduled run,
and a completed run's artifacts. Screenshots go to the test's tmp dir (and /tmp/slmforge-ui.png).

Shares the stack of tests/test_stack.py. After that module's `down` test this brings the stack up
again from its kept data, so the run completed there must still be listed: `down` kept the data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from test_stack import stack  # noqa: F401 - the shared stack fixture

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    # `make` installs both; a machine without them fails here with the hint instead of skipping
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: `apt-get install -y chromium` (make setup does it as root)"
    from playwright import sync_api
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _snap(page, tmp_path: Path, name: str) -> Path:
    out = tmp_path / f"{name}.png"
    page.screenshot(path=str(out), full_page=True)
    return out


def test_ui_shows_the_nightly_schedule_and_run_artifacts(stack, browser, tiny_model_dir, tmp_path):  # noqa: F811
    stack.ensure_up()  # after test_stack's `down`: up again on the kept data
    run_id = stack.completed_run_id
    if run_id is None:  # this module alone: make a completed run first
        run = stack.trigger({"cfg": stack.cfg(tiny_model_dir)})
        assert run.state.is_completed(), f"{run.state}\n{stack.logs()}"
        run_id = str(run.id)
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with stack.api() as client:
        assert client.read_flow_run(run_id).state.is_completed()  # still there after down + up
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
        artifact_keys = {a.key for a in artifacts}
    assert "finetune-report" in artifact_keys, artifact_keys

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)

    # Deployments list → finetune/nightly, with its schedule
    page.goto(f"{stack.ui_url}/deployments")
    row = page.get_by_role("link", name="nightly").first
    row.wait_for()
    page.get_by_text("At 02:00 AM every day").first.wait_for()
    row.click()
    page.wait_for_url("**/deployments/deployment/**")
    page.get_by_text("Next Run").first.wait_for()
    page.get_by_text("Scheduled for").first.wait_for()
    next_run = page.get_by_text("Scheduled for").first.inner_text()
    assert "02:00:00 AM" in next_run, next_run
    body = page.inner_text("body")
    assert "flows/finetune.py:finetune" in body and "gpu" in body
    shots = [_snap(page, tmp_path, "deployment")]

    # The completed run → its Artifacts tab
    page.goto(f"{stack.ui_url}/runs/flow-run/{run_id}")
    page.get_by_text("Completed").first.wait_for()
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("finetune-report").first.wait_for()
    body = page.inner_text("body")
    assert "before-after" in body, body[-2000:]
    shots.append(_snap(page, tmp_path, "run-artifacts"))

    page.close()
    shutil.copyfile(shots[-1], "/tmp/slmforge-ui.png")
    shutil.copyfile(shots[0], "/tmp/slmforge-ui-deployment.png")
    assert all(s.stat().st_size > 10_000 for s in shots)


def test_custom_run_form_submits_a_changed_setting_and_the_run_uses_it(stack, browser, tmp_path):  # noqa: F811
    """Deployments → finetune/nightly → Run → Custom run: the form shows the deployment's own
    settings; one is changed (train.max_steps 2 → 3) and submitted; the run that starts has that
    setting and the others unchanged, and its adapter trained three steps."""
    import json
    import time

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    stack.ensure_up()
    with stack.api() as client:
        nightly = client.read_deployment_by_name("finetune/nightly")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(f"{stack.ui_url}/deployments/deployment/{nightly.id}/run")
    label = page.locator(".schema-form-property__label", has_text="Max Steps")
    field = page.locator(".schema-form-property", has=label).last.locator("input[type=number]")
    assert field.input_value() == "2", "the form starts from the deployment's parameters"
    field.fill("3")
    name = page.locator(".p-label", has=page.get_by_text("Run Name", exact=True)).locator("input").first.input_value()
    shot = _snap(page, tmp_path, "custom-run")

    def named_run():
        with stack.api() as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        return runs[0] if runs else None

    # The UI creates the run, then goes to the deployment's Runs tab. On a busy 2-core machine the
    # stack's SQLite database can refuse a write ("database is locked" in the server's log) and the UI
    # shows "Something went wrong" with no run created: then Submit again, as a user would (up to three
    # times; a run that exists is never submitted twice). If no run appears, say what the page showed.
    run, errors = None, page.get_by_text("Something went wrong")
    for attempt in range(3):
        seen = errors.count()
        page.get_by_role("button", name="Submit").click()
        deadline = time.monotonic() + 45
        while (run := named_run()) is None and errors.count() <= seen and time.monotonic() < deadline:
            time.sleep(2)
        time.sleep(2)
        if run is not None or (run := named_run()) is not None:
            break
        _snap(page, tmp_path, f"after-submit-{attempt}")
    after = _snap(page, tmp_path, "after-submit")
    assert run is not None, (f"no run named {name!r} after three Submits; the page ({after}):\n"
                             f"{page.inner_text('body')[-3000:]}\n{stack.logs()}")
    page.wait_for_url("**tab=Runs")
    page.close()

    deadline = time.monotonic() + 420
    while not run.state.is_final() and time.monotonic() < deadline:
        time.sleep(2)
        run = named_run()
    assert run is not None and run.state.is_completed(), f"{run and run.state}\n{stack.logs()}"
    sent, default = run.parameters["cfg"], nightly.parameters["cfg"]
    assert sent["train"]["max_steps"] == 3
    assert {**sent, "train": {**sent["train"], "max_steps": 2}} == default, "only the changed setting differs"
    fs = stack.s3()
    steps = [json.loads(fs.cat(f))["steps"] for f in fs.find(f"{stack.bucket}/store/adapters")
             if f.endswith("train_metrics.json")]
    assert 3 in steps, steps
    assert shot.stat().st_size > 10_000
