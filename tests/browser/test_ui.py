"""The web UI in a real headless Chromium: the whole user flow through the forms, on a real control plane.

A user opens the API's root and lands on the UI, which asks for the token, opens the one-time address
`tierflow up` prints (the page keeps the token for its tab), registers a chain and a single
model through the form (and sees the sandbox's verdict on bad code), creates a configuration, deploys it,
watches the results go from `created` through `training` to `finished` with per-epoch charts while the
training reports arrive (fed through the real commands topic, as a training workload sends them), re-sends
the datasource to another deployment, deploys the trained chain for inference from the pre-filled form and
sees the exit distribution per tier and the latest predictions from the output topic. The chain's training
report carries its calibrated exits and exit frontier (built by the training job's own code on synthetic
probabilities): the user opens the chain's exits, reads the calibration per exit, switches the frontier's axis,
picks a point, and the inference form is pre-filled with the target that selects it (the value and the point
the decider then chooses are checked against streams/exits.py); a click on the form's own chart fills it again;
the inference served from that target shows its chosen point, the live one, and predicted vs observed shares.
Then the same through an API whose writes all answer 202 (outcome pending): the UI follows the command to its
outcome. Every page is saved as a screenshot under test-artifacts/ui/.

Chromium comes from the Debian `chromium` package (no browser download); without it the test fails and says so.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from playwright.async_api import Page, async_playwright, expect

from tests.conftest import ARTIFACTS, Infra, StackClient, new_plane, start_plane, stop_plane, write_answers
from tests.unit.test_exit_report import synthetic
from tierflow.api.app import create_app
from tierflow.deploy.bootstrap import sandbox_validate
from tierflow.streams import kafka as kio
from tierflow.streams.client import CommandClient
from tierflow.streams.exits import CONFIDENCE, Target, binomial_lower, binomial_upper, choose_limits, parse_frontier
from tierflow.streams.settings import Settings
from tierflow.streams.topics import TopicSpec, ensure_topics
from tierflow.tiers.exit_report import chain_exits

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = ARTIFACTS / "ui"
TOKEN = "ui-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EPOCHS = 3
SUBMIT = "#view button[type=submit]"
#: A model build waits for a fresh sandbox (a TensorFlow import); on a busy 2-core machine that can take a while.
SANDBOX_S = 60


@dataclass
class Env:
    client: TestClient[Any, Any]
    settings: Settings
    base: str
    #: The same API with a zero command timeout: every write answers 202 + Location and the UI follows it.
    impatient_base: str
    #: The isolation level of the sandbox pool the plane validates with (what the UI's footer shows).
    sandbox_level: str


@pytest.fixture(scope="module")
async def env(infra: Infra, sandbox_pool: Any) -> AsyncIterator[Env]:
    settings = await new_plane(infra, "ui")
    settings = replace(settings, api=replace(settings.api, token=TOKEN, command_timeout_s=30.0))
    running = await start_plane(settings, sandbox_validate(sandbox_pool))
    try:
        impatient = replace(settings, api=replace(settings.api, command_timeout_s=0.0))
        async with TestClient(TestServer(create_app(settings)), headers=AUTH) as c, \
                TestClient(TestServer(create_app(impatient)), headers=AUTH) as slow:
            yield Env(c, settings, str(c.make_url("")).rstrip("/"), str(slow.make_url("")).rstrip("/"),
                      sandbox_pool.isolation["level"])
    finally:
        await stop_plane(running)


async def shot(page: Page, name: str) -> None:
    await page.evaluate("window.scrollTo(0, 0)")  # the sticky top bar would otherwise land mid-page
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def register_top_of_chain(env: Env, snippets: dict[str, str]) -> None:
    """cloud <- fog through the API, while the browser does the rest: each build costs a sandbox run."""
    cloud = await env.client.post("/models", json={"name": "cloud", "code": snippets["cloud"], "distributed": True},
                                  headers=AUTH)
    assert cloud.status == 201, await cloud.text()
    fog = await env.client.post("/models", json={"name": "fog", "code": snippets["fog"], "distributed": True,
                                                 "upper_id": (await cloud.json())["id"]}, headers=AUTH)
    assert fog.status == 201, await fog.text()


async def pick_upper(page: Page, name: str) -> None:
    option = page.locator("select[name=upper_id] option", has_text=f"{name} (#")
    await page.select_option("select[name=upper_id]", await option.get_attribute("value"))


async def report(client: CommandClient, kind: str, payload: dict[str, Any]) -> None:
    """One report as a training workload sends it: a command on the commands topic, decided and accepted."""
    event = await client.wait(await client.send(kind, payload))
    assert event.type != "CommandRejected", event.payload


async def report_started(client: CommandClient, deployment_id: int, chains: list[list[int]]) -> None:
    for chain in chains:
        await report(client, "ReportTrainingLaunched", {
            "deployment_id": deployment_id, "result_ids": chain,
            "workload": f"tierflow-train-{deployment_id}-{chain[0]}"})
        await report(client, "ReportTrainingStarted", {
            "deployment_id": deployment_id, "result_ids": chain, "seed": 7,
            "samples": {"train": 800, "validation": 100, "test": 100}})


async def report_epochs(client: CommandClient, deployment_id: int, chains: list[list[int]], epochs: range) -> None:
    for epoch in epochs:
        for chain in chains:
            metrics = {str(rid): {"loss": 1.6 / epoch + 0.1 * i, "accuracy": 0.55 + 0.12 * epoch - 0.03 * i,
                                  "val_loss": 1.8 / epoch + 0.1 * i, "val_accuracy": 0.5 + 0.12 * epoch - 0.03 * i}
                       for i, rid in enumerate(chain)}
            await report(client, "ReportTrainingProgress", {"deployment_id": deployment_id, "result_ids": chain,
                                                              "epoch": epoch, "epochs": EPOCHS, "metrics": metrics})


def synthetic_exits(tiers: int, n: int = 1000) -> list[dict[str, Any]]:
    """The `exits` of each result of a chain as the training job reports them (tiers/exit_report.py, which builds
    the frontier with tiers/frontier.py), on softmax outputs of over-confident exits that get better up the
    chain, on n validation and n test samples."""
    rng = np.random.default_rng(5)
    (val, y), (test, ty) = synthetic(rng, n, tiers), synthetic(rng, n, tiers)
    return chain_exits(val, y, test, ty, [1e-5, 4e-5, 2e-4][:tiers])


async def report_results(client: CommandClient, chains: list[list[int]]) -> dict[int, dict[str, Any]]:
    """The final reports; a chain of three also reports its calibrated exits and frontier. Returns the exits
    reported per result."""
    reported: dict[int, dict[str, Any]] = {}
    for chain in chains:
        exits = synthetic_exits(len(chain)) if len(chain) == 3 else None
        for i, rid in enumerate(chain):
            payload: dict[str, Any] = {"result_id": rid, "metrics": {
                "train": {"loss": 0.5, "accuracy": 0.91 - 0.02 * i},
                "validation": {"loss": 0.6, "accuracy": 0.89 - 0.02 * i},
                "test": {"loss": 0.62, "accuracy": 0.88 - 0.02 * i}},
                "artefacts": {"keras": {"sha256": "a" * 64, "size": 1, "format": "keras"}}}
            if exits is not None:
                payload["exits"] = reported[rid] = exits[i]
            await report(client, "ReportTrainingResult", payload)
    return reported


async def announce_datasource(settings: Settings, deployment_id: int) -> None:
    # 1000 records in two record batches, announced as a Kafka-ML sink does on the embedded broker: its end
    # lookup answers the last batch's first offset + 1, so the control bridge reads [0, 1000) instead of [0, 501).
    await ensure_topics(settings.kafka, extra=[TopicSpec("ui-digits", 1, -1)])
    p = kio.producer(settings.kafka)
    await p.start()
    try:
        for first in (0, 500):
            batch = p.create_batch()
            for i in range(first, first + 500):
                assert batch.append(key=bytes([i % 10]), value=bytes(4), timestamp=None) is not None
            await (await p.send_batch(batch, "ui-digits", partition=0))
        await p.send_and_wait(settings.kafka.control_topic, orjson.dumps({
            "topic": "ui-digits:0:0:501", "input_format": "RAW", "deployment_id": deployment_id,
            "input_config": {"data_type": "float32", "label_type": "uint8", "data_reshape": "28 28",
                             "label_reshape": ""},
            "validation_rate": 0.1, "test_rate": 0.1, "total_msg": 1000, "description": "digits"}))
    finally:
        await p.stop()


async def answer(settings: Settings, topic: str, tiers: list[int]) -> None:
    """Answers on the output topic as the tier agents write them."""
    await ensure_topics(settings.kafka, extra=[TopicSpec(topic, 1, -1)])
    await write_answers(settings, topic, tiers, latency_step_ms=3.0)


async def test_the_whole_flow_in_a_browser(env: Env, snippets: dict[str, str]) -> None:
    assert CHROMIUM.exists(), (f"{CHROMIUM} is missing: install Debian's `chromium` package "
                               "(apt-get install chromium); the browser test never downloads a browser")
    SHOTS.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=15_000)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1360, "height": 900})
            crashes: list[str] = []
            page.on("pageerror", lambda exc: crashes.append(str(exc)))
            await flow(page, env, snippets)
            await flow_through_command_outcomes(await browser.new_page(viewport={"width": 1360, "height": 900}), env)
            assert crashes == [], f"uncaught errors in the page: {crashes}"
        finally:
            await browser.close()


async def flow(page: Page, env: Env, snippets: dict[str, str]) -> None:
    c = env.client
    # The API's root leads to the UI, which is ready; without the token even reads are refused, and the page says
    # where the token is.
    await page.goto(env.base + "/")
    await expect(page).to_have_url(re.compile(r"/ui/(#/models)?$"))
    await expect(page.locator("#health")).to_have_text("ready")
    # The footer shows how model code is confined, as the worker's validator reports it through /readyz.
    level = env.sandbox_level
    await expect(page.locator("#isolation")).to_have_text(re.compile(rf"model code sandbox: {level}"),
                                                          timeout=15_000)
    await expect(page.locator(".alert-error")).to_contain_text("tierflow up")
    # The one-time address `tierflow up` prints: the page keeps the token for this tab and drops it from the
    # address bar; the UI then has nothing yet.
    await page.goto(f"{env.base}/ui/?token={TOKEN}")
    await expect(page).to_have_url(re.compile(r"/ui/(#/models)?$"))
    await expect(page.locator("#token-state")).to_have_text("token set")
    await expect(page.locator(".empty")).to_contain_text("No models yet")
    upper_models = asyncio.create_task(register_top_of_chain(env, snippets))

    # Bad code: the sandbox's verdict is shown on the code field; fixed code registers.
    await page.click("text=New model")
    await page.fill("input[name=name]", "single")
    await page.fill("textarea[name=code]", "model = keras.Sequential([\n    keras.layers.Dense(10)\n")
    await page.click(SUBMIT)
    error = page.locator(".form-error")
    await expect(error).to_contain_text("the model code does not build", timeout=SANDBOX_S * 1000)
    await expect(error).to_contain_text("field: code")
    await expect(page.locator("[data-field=code] .field-error")).to_be_visible()
    await expect(page.locator(".code-gutter .error-line")).to_have_text("1")  # the line the error names
    await shot(page, "01-model-validation-error")
    await page.fill("textarea[name=code]", snippets["single"])
    await page.click(SUBMIT)
    await expect(page.locator(".flash")).to_contain_text("Model 'single' registered: input (None, 28, 28)",
                                                         timeout=SANDBOX_S * 1000)

    # The chain edge -> fog -> cloud through the upper-model picker.
    await upper_models
    await page.click("text=New model")
    await page.fill("input[name=name]", "edge")
    await page.check("input[name=distributed]")
    await pick_upper(page, "fog")
    await expect(page.locator(".chain-preview")).to_contain_text("edge → fog → cloud")
    await page.fill("textarea[name=code]", snippets["edge"])
    await shot(page, "02-model-form")
    await page.click(SUBMIT)
    await expect(page.locator(".flash")).to_contain_text("Model 'edge' registered", timeout=SANDBOX_S * 1000)
    rows = page.locator("table tbody tr")
    await expect(rows).to_have_count(4)
    await expect(model_row(page, "edge").locator(".chain")).to_have_text("edge → fog → cloud")
    await model_row(page, "single").locator("text=Edit").click()
    await expect(page.locator("h1")).to_have_text("Edit model 'single'")
    await page.fill("input[name=description]", "the one-exit baseline")
    await page.click(SUBMIT)
    await expect(page.locator(".flash")).to_contain_text("Model 'single' saved")
    await expect(model_row(page, "single")).to_contain_text("the one-exit baseline")
    await expect(model_row(page, "single")).to_contain_text("v2")
    await page.fill("input[name=filter]", "fo")
    await expect(rows).to_have_count(1)
    await page.fill("input[name=filter]", "")
    await expect(rows).to_have_count(4)
    await shot(page, "03-models")

    # A configuration with the chain's top model (it brings the chain) and the single model.
    await page.click("nav >> text=Configurations")
    await page.click("text=New configuration")
    await page.fill("input[name=name]", "thesis")
    await page.check("label.check-row:has-text('cloud') input")
    await page.check("label.check-row:has-text('single') input")
    await page.click(SUBMIT)
    await expect(page.locator(".flash")).to_contain_text("Configuration 'thesis' created")
    tags = page.locator("tr", has_text="thesis").locator(".tag")
    await expect(tags).to_have_count(2)
    assert sorted(await tags.all_inner_texts()) == ["edge → fog → cloud", "single"]
    await shot(page, "04-configurations")

    # Deploy it: four results, waiting for data.
    await page.click("tr:has-text('thesis') >> text=Deploy")
    await page.fill("input[name=fit_options]", str(EPOCHS))
    await page.click(SUBMIT)
    await expect(page.locator(".flash")).to_contain_text("4 result(s)")
    await expect(page).to_have_url(re.compile(r"#/deployments/\d+$"))
    deployment_id = int(page.url.rsplit("/", 1)[1])
    cards = page.locator("section.result")
    await expect(cards).to_have_count(4)
    await expect(page.locator("section.result .badge")).to_have_text(["created"] * 4)
    await expect(page.locator(".alert-info")).to_contain_text("Waiting for training data")

    # Data arrives and training reports come in: the page follows them live, with a chart per metric.
    results = (await (await c.get(f"/deployments/{deployment_id}/results")).json())["items"]
    chains = [list(ch) for ch in sorted({tuple(r["chain"]) for r in results})]
    await announce_datasource(env.settings, deployment_id)
    await expect(page.locator(".alert-info")).to_contain_text("ui-digits:0 [0, 1000) (RAW)")
    client = StackClient(env.settings)  # the orchestrator's and workloads' reports, with their proofs
    await client.start()
    try:
        reported = await flow_training(page, client, deployment_id, chains)
    finally:
        await client.stop()
    await expect(page.locator("section.result .badge")).to_have_text(["finished"] * 4)
    assert await page.locator("section.result h2").all_inner_texts() == [
        f"{name} result #{rid} · v{version}" for name, rid, version in _names_in_chain_order(results)]
    for card in await cards.all():
        await expect(card.locator("figure[data-chart=Loss] circle")).to_have_count(2 * EPOCHS)
        await expect(card.locator("figure[data-chart=Accuracy] circle")).to_have_count(2 * EPOCHS)
        await expect(card.locator("table.metrics tbody tr")).to_have_count(3)
    await expect(cards.first.locator("figure[data-chart=Accuracy] .legend")).to_contain_text("train 0.9100")
    await shot(page, "06-deployment-results")
    await page.click("nav >> text=Deployments")
    await expect(page.locator(f"tr[data-id='{deployment_id}'] .badge")).to_have_text(["finished"] * 4)
    await shot(page, "07-deployments")

    # Datasources: the announced one is listed and re-sent to a second deployment.
    conf_id = (await (await c.get(f"/deployments/{deployment_id}")).json())["configuration_id"]
    other = await (await c.post("/deployments", json={"configuration_id": conf_id, "batch": 32},
                                headers=AUTH)).json()
    await page.click("nav >> text=Datasources")
    row = page.locator("tr", has_text="ui-digits:0 [0, 1000)")
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("announced")
    # The range training reads, the one the sink announced, and why they differ.
    await expect(row.locator(".range-moved")).to_contain_text("announced [0, 501)")
    reasons = row.locator("details.reasons")
    await reasons.locator("summary").click()
    await expect(reasons.locator("div.reason-text")).to_be_visible()
    await expect(reasons.locator("div.reason-text")).to_contain_text("ui-digits[0]: end 501 -> 1000")
    await row.locator("select[name=deployment_id]").select_option(str(other["id"]))
    await row.locator("text=Send").click()
    await expect(page.locator(".flash")).to_contain_text(f"sent to deployment #{other['id']}")
    await expect(page.locator("table tbody tr")).to_have_count(2)
    await expect(page.locator("tr", has_text="sent from #").locator("a")).to_have_text(f"#{other['id']}")
    await shot(page, "08-datasources")

    # Inference from the finished edge result: the form is pre-filled from the deployment's datasource.
    edge = next(r for r in results if r["model_name"] == "edge")
    await page.goto(f"{env.base}/ui/#/deployments/{deployment_id}")
    await page.locator(f"section[data-result='{edge['id']}']").locator("text=Deploy for inference").click()
    await expect(page.locator("select[name=input_format]")).to_have_value("RAW")
    await expect(page.locator("textarea[name=input_config]")).to_have_value(re.compile(r'"data_reshape": "28 28"'))
    await expect(page.locator(".tiers-form tbody tr")).to_have_count(3)
    await expect(page.locator("form .hint", has_text="Pre-filled")).to_contain_text("deployment #" +
                                                                                    str(deployment_id))
    await page.fill("input[name=limit]", "0.7")
    await page.locator(".tier-limit").nth(1).fill("0.9")
    await shot(page, "09-inference-form")
    await page.click(SUBMIT)
    await expect(page.locator(".flash")).to_contain_text("edge → fog → cloud")
    await expect(page.locator(".page-header .badge")).to_have_text("running")
    inference_id = int(page.url.rsplit("/", 1)[1])
    inference = await (await c.get(f"/inferences/{inference_id}")).json()
    assert [t["limit"] for t in inference["tiers"][:2]] == [0.7, 0.9]
    assert inference["input_config"]["data_reshape"] == "28 28"
    await expect(page.locator(".kpi", has_text="Answers in window")).to_contain_text("0")

    # Answers arrive on the output topic: exit distribution, latency and predictions follow.
    await answer(env.settings, inference["output_topic"], [0] * 6 + [1] * 3 + [2])
    await expect(page.locator(".kpi", has_text="Answers in window")).to_contain_text("10")
    await expect(page.locator(".bar-row[data-tier='0'] .bar-value")).to_contain_text("60.0 %")
    await expect(page.locator(".bar-row[data-tier='2'] .bar-value")).to_contain_text("10.0 %")
    await expect(page.locator(".card", has_text="Latest predictions").locator("tbody tr")).to_have_count(10)
    await shot(page, "10-inference")
    await page.click(".page-header >> text=Stop")
    await page.click(".page-header >> text=Confirm stop")
    await expect(page.locator(".page-header .badge")).to_have_text("stopped")
    await page.click("nav >> text=Inferences")
    await expect(page.locator(f"tr[data-id='{inference_id}'] .badge")).to_have_text("stopped")
    await shot(page, "11-inferences")
    await page.click(f"tr[data-id='{inference_id}'] >> text=Delete")
    await page.click(f"tr[data-id='{inference_id}'] >> text=Confirm delete")
    await expect(page.locator(".empty")).to_contain_text("No inferences yet")
    assert (await c.get(f"/inferences/{inference_id}")).status == 404

    await flow_frontier(page, env, deployment_id, edge, reported)

    # A rejected write is a readable message: a configuration that deployments use cannot be deleted.
    await page.click("nav >> text=Configurations")
    await page.click("tr:has-text('thesis') >> text=Delete")
    await page.click("tr:has-text('thesis') >> text=Confirm delete")
    await expect(page.locator(".flash-error")).to_contain_text("used by deployment")
    await shot(page, "12-configuration-conflict")


def target_for(record: dict[str, Any], point: int, entry: int = 0) -> float:
    """The `max_accuracy_drop` the UI fills in for a point: its one-sided 90% upper bound on the drop against
    the top exit (streams/exits.py), rounded up to 5 decimals."""
    counts = next(e for e in record["entries"] if e["entry"] == entry)["validation"]
    alpha = 1.0 - CONFIDENCE
    bound = (binomial_upper(counts["b"][point], counts["n"], alpha / 2)
             - binomial_lower(counts["c"][point], counts["n"], alpha / 2))
    value = float(f"{math.ceil(bound * 1e5) / 1e5:.5f}")
    return value if value >= bound else round(value + 1e-5, 5)


async def pick_point(page: Page, position: int | None = None) -> int:
    """Click a point of the frontier chart as a user does, at its place on the screen; the point the page
    picked (the nearest to the click: on a dense frontier a neighbour a pixel away may be it)."""
    points = page.locator("figure[data-chart=frontier] circle.pt.front")
    count = await points.count()
    assert count >= 5, f"the frontier shows only {count} points"
    point = points.nth(count // 2 if position is None else position)
    await point.scroll_into_view_if_needed()
    box = await point.bounding_box()
    assert box is not None
    before = await page.locator(".point-summary").get_attribute("data-point") \
        if await page.locator(".point-summary").count() else None
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    await page.mouse.click(x, y)
    summary = page.locator(".point-summary")
    await expect(summary).to_have_count(1)
    if before is not None:
        await expect(summary).not_to_have_attribute("data-point", before)
    picked = int(await summary.get_attribute("data-point") or -1)
    at = await page.locator(f"figure[data-chart=frontier] circle.pt.front[data-point='{picked}']").bounding_box()
    assert at is not None and math.hypot(at["x"] + at["width"] / 2 - x, at["y"] + at["height"] / 2 - y) < 4
    return picked


async def flow_frontier(page: Page, env: Env, deployment_id: int, edge: dict[str, Any],
                        reported: dict[int, dict[str, Any]]) -> None:
    """The chain's calibrated exits and frontier; a picked point pre-fills the inference form with the target
    that selects it; the inference served from it shows its chosen and live points."""
    c = env.client
    chain = edge["chain"]
    record = reported[chain[-1]]["frontier"]
    await page.goto(f"{env.base}/ui/#/deployments/{deployment_id}")
    await page.locator(f"section[data-result='{edge['id']}']").locator("text=Exits and frontier").click()
    await expect(page).to_have_url(re.compile(rf"#/results/{edge['id']}/exits$"))
    rows = page.locator("table.calibration tbody tr")
    await expect(rows).to_have_count(3)
    for k, rid in enumerate(chain):  # T and the ECE before -> after, per exit, as reported
        cal = reported[rid]["calibration"]
        await expect(rows.nth(k)).to_contain_text(f"{reported[rid]['temperature']:.3f}")
        await expect(rows.nth(k)).to_contain_text(f"{cal['ece_before']:.4f} → {cal['ece_after']:.4f}")
    chart = page.locator("figure[data-chart=frontier]")
    await expect(chart).to_contain_text(f"{len(record['entries'][0]['limits'])} points")
    await page.click(".segmented button[data-x=cost]")
    await expect(chart).to_have_attribute("data-x", "cost")
    await expect(chart).to_contain_text("compute per input")
    await page.click(".segmented button[data-x=early]")
    await expect(chart).to_have_attribute("data-x", "early")

    # A point picked on the chart: what it does, and the target of each kind that selects it.
    picked = await pick_point(page)
    await expect(page.locator(".point-summary")).to_have_attribute("data-point", str(picked))
    limits = record["entries"][0]["limits"][picked]
    await expect(page.locator(".point-tiers .point-limit")).to_have_text([str(x) if x <= 1 else f"{x} (never)"
                                                                          for x in limits] + ["top"])
    value = target_for(record, picked)
    drop_row = page.locator("table.targets tr[data-kind=max_accuracy_drop]")
    await expect(drop_row.locator("td.num")).to_have_text(str(value))
    await shot(page, "14-exits-frontier")

    # The form, pre-filled from it: a target (the frontier's limits are on the calibrated confidence, which
    # typed limits do not compare), and the point the decider will choose for it.
    await drop_row.locator("text=Deploy with this target").click()
    await expect(page.locator("select[name=limits_from]")).to_have_value("target")
    await expect(page.locator("select[name=target_kind]")).to_have_value("max_accuracy_drop")
    await expect(page.locator("input[name=target_value]")).to_have_value(str(value))
    parsed = parse_frontier(record)
    expected = choose_limits(parsed, Target("max_accuracy_drop", value)).point
    await expect(page.locator(".target-preview")).to_have_attribute("data-point", str(expected))
    # A click on the form's own chart fills the fields again, with another point's target.
    other = await pick_point(page, position=await page.locator("figure[data-chart=frontier] circle.pt.front")
                             .count() // 4)
    value = target_for(record, other)
    await expect(page.locator("input[name=target_value]")).to_have_value(str(value))
    await expect(page.locator(".point-summary")).to_have_attribute("data-point", str(other))
    expected = choose_limits(parsed, Target("max_accuracy_drop", value)).point
    await expect(page.locator(".target-preview")).to_have_attribute("data-point", str(expected))
    await expect(page.locator(".tier-chosen").first).to_contain_text(str(record["entries"][0]["limits"][expected][0]))
    await page.fill("input[name=output_topic]", f"tierflow.infer.edge.{edge['id']}.target.out")
    await shot(page, "15-inference-form-from-a-point")
    await page.click(SUBMIT)
    await expect(page.locator(".flash")).to_contain_text(f"from max_accuracy_drop {value}")
    await expect(page).to_have_url(re.compile(r"#/inferences/\d+$"))
    inference_id = int(page.url.rsplit("/", 1)[1])
    inference = await (await c.get(f"/inferences/{inference_id}")).json()
    # The decider chose the point the form said it would.
    assert inference["target"] == {"max_accuracy_drop": value}
    assert inference["predicted"]["point"] == expected
    assert [t["limit"] for t in inference["tiers"][:2]] == record["entries"][0]["limits"][expected]

    # The inference page: the target, predicted shares and agreement per tier, the chosen point on the chart;
    # once answers arrive, the observed shares and the live point.
    await expect(page.locator(".target-summary")).to_contain_text(f"max_accuracy_drop {value}")
    await expect(page.locator("figure[data-chart=frontier] [data-mark=chosen]")).to_have_count(1)
    predicted = inference["predicted"]["shares"]
    await expect(page.locator("td.pred-share")).to_have_text([f"{x * 100:.1f} %" for x in predicted])
    await expect(page.locator("td.obs-share")).to_have_text(["—"] * 3)
    await answer(env.settings, inference["output_topic"], [0] * 7 + [1] * 2 + [2])
    await expect(page.locator("td.obs-share")).to_have_text(["70.0 %", "20.0 %", "10.0 %"])
    await expect(page.locator("figure[data-chart=frontier] [data-mark=observed]")).to_have_count(1)
    await expect(page.locator(".bar-row[data-tier='0'] .bar-predicted")).to_have_count(1)
    await shot(page, "16-inference-from-a-target")
    await page.click(".page-header >> text=Stop")
    await page.click(".page-header >> text=Confirm stop")
    await expect(page.locator(".page-header .badge")).to_have_text("stopped")
    assert (await c.delete(f"/inferences/{inference_id}")).status == 200


def model_row(page: Page, name: str) -> Any:
    return page.locator("tbody tr").filter(has=page.locator("td:nth-child(2) b", has_text=re.compile(f"^{name}$")))


async def flow_through_command_outcomes(page: Page, env: Env) -> None:
    """When an outcome takes longer than the command timeout, writes answer 202 and the UI follows
    `/commands/{id}`: a rejection still lands on its field, a success still reads as one."""
    crashes: list[str] = []
    page.on("pageerror", lambda exc: crashes.append(str(exc)))
    await page.goto(env.impatient_base + "/ui/#/models")
    await page.fill("#token", TOKEN)  # the token is kept per tab and origin: typed in, as a user may
    await page.click("#token-form button")
    await expect(page.locator("#token-state")).to_have_text("token set")
    await model_row(page, "fog").locator("text=Edit").click()
    await page.fill("input[name=name]", "cloud")
    await page.click(SUBMIT)
    await expect(page.locator(".form-error")).to_contain_text("a model named 'cloud' already exists")
    await expect(page.locator("[data-field=name] .field-error")).to_be_visible()
    await shot(page, "13-rejection-from-command-outcome")
    await page.fill("input[name=name]", "fog")
    await page.fill("input[name=description]", "middle tier")
    await page.click(SUBMIT)
    await expect(page.locator(".flash")).to_contain_text("Model 'fog' saved")
    await expect(model_row(page, "fog")).to_contain_text("middle tier")
    assert crashes == [], f"uncaught errors in the page: {crashes}"
    await page.close()


async def flow_training(page: Page, client: CommandClient, deployment_id: int, chains: list[list[int]]
                        ) -> dict[int, dict[str, Any]]:
    """The training reports arrive epoch by epoch; the open page follows them without a reload."""
    await report_started(client, deployment_id, chains)
    await report_epochs(client, deployment_id, chains, range(1, 2))
    cards = page.locator("section.result")
    await expect(page.locator("section.result .badge")).to_have_text(["training"] * 4)
    await expect(cards.first.locator("figure[data-chart=Loss] circle")).to_have_count(2)
    await expect(cards.first.locator(".progress-line")).to_contain_text(f"epoch 1 / {EPOCHS}")
    await shot(page, "05-deployment-training")
    await report_epochs(client, deployment_id, chains, range(2, EPOCHS + 1))
    return await report_results(client, chains)


def _names_in_chain_order(results: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """The order the page shows results in: chain by chain (bottom first), chains by their bottom result."""
    ordered = sorted(results, key=lambda r: (r["chain"][0], r["chain"].index(r["id"])))
    return [(r["model_name"], r["id"], r["model_version"]) for r in ordered]


async def test_the_ui_is_served_from_the_package_and_works_offline(env: Env) -> None:
    c = env.client
    # The root and /ui lead to the page; the page and its assets come from api/static, nothing from elsewhere.
    for path in ("/", "/ui"):
        r = await c.get(path, allow_redirects=False)
        assert r.status == 302 and r.headers["Location"] == "/ui/", path
    page = await c.get("/ui/")
    assert page.status == 200 and page.content_type == "text/html"
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    html = await page.text()
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', html)
    assert "static/js/app.js" in assets and "static/css/tierflow.css" in assets
    static = Path(__file__).resolve().parents[2] / "api" / "static"
    for f in sorted(static.rglob("*")):
        if not f.is_file():
            continue
        text = f.read_text()
        assert not re.search(r"""(?:src|href|from|import)\s*=?\s*["']https?://""", text), f"{f} loads from the network"
        r = await c.get("/ui/static/" + f.relative_to(static).as_posix())
        assert r.status == 200, f
    js = await c.get("/ui/static/js/app.js")
    assert js.content_type in ("application/javascript", "text/javascript")
    # Nothing outside the static folder is served.
    assert (await c.get("/ui/static/../ui.py")).status in (403, 404)
    assert (await c.get("/ui/static/nope.js")).status == 404
