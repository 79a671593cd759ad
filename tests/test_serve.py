"""`kind-dit serve`: a real uvicorn server on a free localhost port, real HTTP. Mixed requests for
three classes share one batched forward and return exactly what `kind-dit sample` draws; the tailor
cache evicts under a tiny budget and reloads to the same images; a tailor file damaged on disk is
refused at load while the server keeps serving, and any failure to load one tailor fails only its
requests and pins no slot; a failed batch and a body that is not a JSON object get JSON errors that
say what to do; a client that leaves while queued is not computed for; `--vae` reaches the decoder;
tailor rank 0 with a null tailor serves; the JSON endpoints and the page answer."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from kind.cli.main import main
from kind.core.decomposition import PartsError
from kind.core.diffusion import Diffusion, DiffusionConfig
from kind.core.model import DiT, ModelConfig
from kind.core.seeds import sample_seed
from kind.serve.app import create_app
from kind.serve.batcher import Batcher
from kind.serve.cache import TailorCache
from kind.serve.draw import Settings, draw, padding
from kind.serve.server import Background
from kind.store.parts import decompose

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["zero", "one", "two", "three"]
# ddpm draws fresh per-sample noise every step too; 3 steps keep it fast
SETTINGS = {"steps": 3, "cfg_scale": 2.0, "sampler": "ddpm"}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    torch.manual_seed(0)
    model = DiT(ModelConfig(class_names=NAMES, rank_tailor=4))
    with torch.no_grad():  # leave the identity start so every class's tailors matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return decompose(model.eval(), DiffusionConfig(), tmp_path_factory.mktemp("serve") / "parts")


@contextmanager
def serving(parts, **options):
    with Background(create_app(parts, **options)) as url:
        yield url


@pytest.fixture(scope="module")
def url(parts):
    # a wait long enough that requests sent together always share a batch
    with serving(parts, max_wait_ms=500) as url:
        yield url


def post(url, body, accept=None, content_type="application/json"):
    """(status, headers, body bytes) of POST /generate; `body` as JSON, or bytes sent as they are."""
    headers = {"Content-Type": content_type} | ({"Accept": accept} if accept else {})
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/generate", data, headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=10) as r:
        return r.headers.get_content_type(), r.read()


def images(body) -> np.ndarray:
    return np.load(io.BytesIO(body), allow_pickle=False)["arr_0"]


def sample_cli(parts, out, name, n, seed):
    """What `kind-dit sample` draws from the parts for one class."""
    main(["sample", str(parts), "--classes", name, "--n", str(n), "--seed", str(seed),
          "--steps", "3", "--cfg-scale", "2", "--sampler", "ddpm", "--out", str(out)])  # fmt: skip
    return np.load(out / "samples.npz")["arr_0"]


def test_mixed_requests_share_one_forward_and_equal_kind_dit_sample(url, parts, tmp_path):
    requests = [("one", 8, 11), ("two", 10, 12), ("three", 12, 13)]  # kind.serve.draw: ≥ 16 rows
    answers = {}

    def ask(name, n, seed):
        answers[name] = post(url, {"class_name": name, "n": n, "seed": seed, **SETTINGS},
                             accept="application/x-npz")  # fmt: skip

    threads = [threading.Thread(target=ask, args=r) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {a[0] for a in answers.values()} == {200}
    assert len({a[1]["X-Kind-Batch"] for a in answers.values()}) == 1  # one batch for all three
    assert {a[1]["X-Kind-Batch-Classes"] for a in answers.values()} == {"3"}
    for name, n, seed in requests:
        served = images(answers[name][2])
        assert served.shape == (n, 28, 28, 1) and served.dtype == np.uint8
        # bit for bit (kind.serve.draw says why the batch does not change the arithmetic)
        assert np.array_equal(served, sample_cli(parts, tmp_path / name, name, n, seed)), name


def test_a_sample_does_not_depend_on_its_batch_mates_to_the_last_bit(parts):
    cache = TailorCache(parts)
    cache.acquire([0, 1, 2, 3])
    diffusion, settings = Diffusion(DiffusionConfig()), Settings("ddim", 3, 2.0)
    c = [cache.slot_class(i) for i in range(4)]
    keep_floats = lambda x: x  # noqa: E731 (decode: the float samples, not uint8 images)
    alone = draw(cache.model, diffusion, [c[1]], [7], settings, keep_floats)
    # alone the batch is too small to fold and odd-sized: padded (see kind.serve.draw)
    for before, after in [([c[0]] * 3, []), ([c[2]] * 5, [c[3]] * 2), ([], [c[3]] * 9)]:
        labels = before + [c[1]] + after
        seeds = [100 + i for i in range(len(before))] + [7] + [200 + i for i in range(len(after))]
        mixed = draw(cache.model, diffusion, labels, seeds, settings, keep_floats)
        assert torch.equal(mixed[len(before)], alone[0])


def test_unknown_class_and_out_of_range_fields_are_4xx_that_name_the_problem(url):
    status, _, body = post(url, {"class_name": "seven"})
    detail = json.loads(body)["detail"]
    assert status == 422 and "'seven'" in detail and all(f"'{n}'" in detail for n in NAMES)
    status, _, body = post(url, {"class_name": "one", "n": 1000, "steps": 0, "cfg_scale": -1})
    detail = json.loads(body)["detail"]
    assert status == 422 and "n:" in detail and "steps:" in detail and "cfg_scale:" in detail
    status, _, body = post(url, {"class_name": "one", "steps": 5000})
    assert status == 422 and "1..1000" in json.loads(body)["detail"]
    # a true or a "2" is a mistake to name, not a number to guess; a long name is cut short
    status, _, body = post(url, {"class_name": "x" * 5000, "n": True, "cfg_scale": "1.5"})
    detail = json.loads(body)["detail"]
    assert status == 422 and "n: Input should be a valid integer" in detail
    assert "cfg_scale: Input should be a valid number" in detail and len(detail) < 500


def test_a_body_that_is_not_a_json_object_gets_a_message_that_says_how_to_send_one(url):
    sent = b'{"class_name": "one"}'
    status, _, body = post(url, sent, content_type="text/plain")
    detail = json.loads(body)["detail"]
    assert status == 422 and "not read as JSON (Content-Type: text/plain)" in detail
    assert "Content-Type: application/json" in detail
    status, _, body = post(url, b'{"class_name": one}')
    detail = json.loads(body)["detail"]
    assert status == 422 and detail.startswith("the body is not valid JSON (Expecting value at")
    assert 'a JSON object like {"class_name"' in detail
    status, _, body = post(url, [1])
    assert status == 422 and json.loads(body)["detail"].startswith("the body must be a JSON object")


def test_cache_evicts_under_a_tiny_budget_and_a_reloaded_tailor_draws_the_same(url, parts):
    slot = json.loads(get(url, "/cache")[1])["slot_bytes"]
    with serving(parts, cache_bytes=int(1.5 * slot), max_wait_ms=10) as small:
        ask = {"class_name": "one", "n": 4, "seed": 5, **SETTINGS, "format": "npz"}
        first = post(small, ask)
        assert first[0] == 200 and post(small, ask | {"class_name": "two"})[0] == 200
        again = post(small, ask)
        stats = json.loads(get(small, "/cache")[1])
        # under capacity 1, two classes asked together run in two batches, and both succeed
        both = []
        threads = [threading.Thread(target=lambda c=c: both.append(post(small, ask | {"class_name": c})))
                   for c in ("zero", "three")]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert stats["capacity"] == 1 and stats["evictions"] == 2 and stats["misses"] == 3
    assert [t["classes"] for t in stats["loaded"]] == [["one"]]
    assert again[0] == 200 and np.array_equal(images(again[2]), images(first[2]))
    assert [b[0] for b in both] == [200, 200]
    assert both[0][1]["X-Kind-Batch"] != both[1][1]["X-Kind-Batch"]
    # the same request on the roomy server (other batch mates, other slot): the same images
    assert np.array_equal(images(post(url, ask)[2]), images(first[2]))


def test_a_tailor_file_damaged_after_start_is_refused_and_the_server_keeps_serving(parts, tmp_path):
    copy = shutil.copytree(parts, tmp_path / "parts")
    with serving(copy, max_wait_ms=10) as url:
        damaged = copy / "tailor_0002.safetensors"
        data = bytearray(damaged.read_bytes())
        data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])
        damaged.write_bytes(bytes(data))
        status, _, body = post(url, {"class_name": "two", **SETTINGS})
        detail = json.loads(body)["detail"]
        assert status == 500 and "['two']" in detail
        assert "tailor_0002.safetensors" in detail and "sha256" in detail
        assert post(url, {"class_name": "one", "n": 2, **SETTINGS})[0] == 200
        stats = json.loads(get(url, "/cache")[1])
        assert stats["load_errors"] == 1 and [t["classes"] for t in stats["loaded"]] == [["one"]]
        assert json.loads(get(url, "/health")[1])["status"] == "ok"


def together(url, *asks):
    """Send the POST /generate bodies `asks` at once; their answers, in order."""
    answers = [None] * len(asks)

    def ask(i):
        answers[i] = post(url, asks[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_other_guidance_runs_in_its_own_batch_with_its_own_scale(url, parts):
    """Requests share a batch only with equal settings; a cfg_scale of 0 is 0, not the default."""
    asks = [{"class_name": "one", "n": 2, "seed": 3, **SETTINGS},
            {"class_name": "two", "n": 2, "seed": 4, **SETTINGS, "cfg_scale": 0.0}]  # fmt: skip
    answers = together(url, *({"format": "npz"} | a for a in asks))
    assert [a[0] for a in answers] == [200, 200]
    assert answers[0][1]["X-Kind-Batch"] != answers[1][1]["X-Kind-Batch"]
    cache, diffusion = TailorCache(parts), Diffusion(DiffusionConfig())
    for ask, answer in zip(asks, answers, strict=True):
        class_id = NAMES.index(ask["class_name"])
        cache.acquire([cache.group_of(class_id)])
        settings = Settings(ask["sampler"], ask["steps"], ask["cfg_scale"])
        alone = draw(cache.model, diffusion, [cache.slot_class(class_id)] * 2,
                     [sample_seed(ask["seed"], ask["class_name"], i) for i in range(2)],
                     settings)  # fmt: skip
        assert np.array_equal(images(answer[2]), alone.permute(0, 2, 3, 1).numpy())


def missing_tailor(parts, tmp_path, group="2"):
    """A copy of `parts` whose manifest lists no tailor for `group`."""
    copy = shutil.copytree(parts, tmp_path / "parts")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["tailors"][group]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def batched(cache, asks, **options):
    """Submit `asks` (class id, n, seed) to a Batcher in this order at once; their outcomes."""

    async def run():
        batcher = Batcher(cache, Diffusion(DiffusionConfig()), **options)
        batcher.start()
        settings = Settings("ddim", 2, 2.0)
        try:
            jobs = [batcher.submit(c, n, seed, settings) for c, n, seed in asks]
            return await asyncio.gather(*jobs, return_exceptions=True), batcher
        finally:
            await batcher.stop()

    return asyncio.run(run())


def test_a_request_after_a_failed_one_in_its_batch_gets_its_own_images(parts, tmp_path):
    cache = TailorCache(missing_tailor(parts, tmp_path))
    (failed, mate), _ = batched(cache, [(2, 3, 0), (1, 2, 5)], max_wait_ms=200)
    assert isinstance(failed, PartsError) and mate.batch_samples == 2
    cache.acquire([1])
    alone = draw(cache.model, Diffusion(DiffusionConfig()), [cache.slot_class(1)] * 2,
                 [sample_seed(5, "one", i) for i in range(2)], Settings("ddim", 2, 2.0))  # fmt: skip
    assert torch.equal(mate.images, alone)


def test_max_batch_bounds_the_forward_with_its_padding(parts, monkeypatch):
    """Four classes of one sample each pad to 16 to fold (kind.serve.draw): with room for 12
    samples a forward, padding included, they cannot all share one forward."""
    import kind.serve.batcher

    sizes, drawn = [], kind.serve.batcher.draw

    def spy(model, diffusion, labels, seeds, settings, decode=None):
        groups = len({int(model.host_slot_of[c]) for c in labels})
        sizes.append(len(labels) + padding(model, len(labels), groups, True))
        return drawn(model, diffusion, labels, seeds, settings, decode)

    monkeypatch.setattr(kind.serve.batcher, "draw", spy)
    cache = TailorCache(parts)
    assert 4 + padding(cache.model, 4, 4, True) == 16  # the case
    results, _ = batched(cache, [(c, 1, c) for c in range(4)], max_batch=12, max_wait_ms=200)
    assert len({r.batch for r in results}) == 2 and max(sizes) <= 12


def test_the_least_recently_used_tailor_is_the_one_evicted(parts):
    cache = TailorCache(parts, capacity=2)
    for group in (0, 1, 0, 2):  # 0 used again after 1: 1 is the least recently used
        assert cache.acquire([group]) == {}
        cache.release([group])
    assert [t["classes"] for t in cache.stats()["loaded"]] == [["zero"], ["two"]]


def test_a_stopped_batcher_fails_its_requests_and_health_says_so(parts, monkeypatch):
    """Should a bug end the batcher's worker, requests fail with the cause instead of hanging,
    and /health answers 503 for a load balancer to see."""
    import kind.serve.batcher

    def broken(self):
        raise RuntimeError("a bug in the batcher")

    monkeypatch.setattr(kind.serve.batcher.Batcher, "_select", broken)
    with serving(parts, max_wait_ms=10) as url:
        status, _, body = post(url, {"class_name": "one", "n": 1, **SETTINGS})
        assert status == 500 and "batcher stopped (RuntimeError: a bug in the batcher)" in str(body)
        assert post(url, {"class_name": "two", "n": 1, **SETTINGS})[0] == 500  # at once
        with pytest.raises(urllib.error.HTTPError) as e:
            get(url, "/health")
        assert e.value.code == 503 and "restart the server" in json.loads(e.value.read())["status"]


def test_stopping_fails_the_batch_in_flight_instead_of_leaving_it_pending(parts, monkeypatch):
    import kind.serve.batcher

    started, release = threading.Event(), threading.Event()

    def slow(*args, **kwargs):
        started.set()
        release.wait(10)
        return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)

    monkeypatch.setattr(kind.serve.batcher, "draw", slow)

    async def run():
        batcher = Batcher(TailorCache(parts), Diffusion(DiffusionConfig()), max_wait_ms=0)
        batcher.start()
        job = asyncio.ensure_future(batcher.submit(1, 1, 0, Settings("ddim", 2, 2.0)))
        await asyncio.to_thread(started.wait, 10)
        await batcher.stop()
        release.set()
        return await asyncio.wait_for(asyncio.gather(job, return_exceptions=True), 5)

    (outcome,) = asyncio.run(run())
    assert isinstance(outcome, asyncio.CancelledError)


def test_a_tailor_missing_from_the_manifest_fails_its_requests_only_and_pins_nothing(
    parts, tmp_path
):
    copy = missing_tailor(parts, tmp_path)
    ask = {"n": 1, **SETTINGS, "format": "npz"}
    with serving(copy, cache_tailors=2, max_wait_ms=300) as url:
        one, two = together(url, ask | {"class_name": "one"}, ask | {"class_name": "two"})
        assert one[0] == 200 and one[1]["X-Kind-Batch-Classes"] == "1"  # two's batch-mate
        detail = json.loads(two[2])["detail"]
        assert two[0] == 500 and "['two']" in detail and "lists no tailor file" in detail
        assert not any(t["in_use"] for t in json.loads(get(url, "/cache")[1])["loaded"])
        # both slots free again: two other classes load and run together
        answers = together(url, ask | {"class_name": "zero"}, ask | {"class_name": "three"})
        assert [a[0] for a in answers] == [200, 200]
        assert answers[0][1]["X-Kind-Batch"] == answers[1][1]["X-Kind-Batch"]


def test_a_manifest_without_the_first_groups_tailor_still_starts(parts, tmp_path):
    """The slot size comes from a tailor the manifest lists; the missing one fails alone."""
    copy = shutil.copytree(parts, tmp_path / "parts")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["tailors"]["0"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    cache = TailorCache(copy, capacity=1)
    assert cache.slot_bytes == TailorCache(parts, capacity=1).slot_bytes
    assert list(cache.acquire([0])) == [0] and cache.acquire([1]) == {}


def test_parts_swapped_under_the_server_are_named_with_a_restart(parts, tmp_path):
    """A parts directory replaced by another decomposition while the server runs: a tailor not
    yet loaded fails its sha256 against the manifest read at start; the error says why and to
    restart, not to copy the file again."""
    copy = shutil.copytree(parts, tmp_path / "parts")
    cache = TailorCache(copy, capacity=1)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / manifest["tailors"]["2"]["file"]).write_bytes(b"another model's tailor")
    assert "copy it again" in str(cache.acquire([2])[2])  # the manifest is the one served
    manifest["tailors"]["2"]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert "changed since the server started" in str(cache.acquire([2])[2])


def test_an_unexpected_error_loading_a_tailor_is_its_groups_and_frees_the_slot(parts, monkeypatch):
    cache = TailorCache(parts, capacity=1)

    def out_of_memory(*args):
        raise RuntimeError("CUDA OOM")

    monkeypatch.setattr(cache, "_write", out_of_memory)
    failed = cache.acquire([1])
    assert list(failed) == [1] and "['one']" in str(failed[1])
    assert "RuntimeError: CUDA OOM" in str(failed[1])
    monkeypatch.undo()
    assert cache.acquire([2]) == {}  # the one slot was not lost
    assert [t["classes"] for t in cache.stats()["loaded"]] == [["two"]]


def test_a_failed_batch_is_a_json_500_that_names_the_cause_and_the_server_goes_on(url, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug in the forward")

    monkeypatch.setattr("kind.serve.batcher.draw", broken)
    status, headers, body = post(url, {"class_name": "one", "n": 1, **SETTINGS})
    assert status == 500 and headers.get_content_type() == "application/json"
    assert json.loads(body)["detail"].startswith(
        "the batch failed: RuntimeError: a bug in the forward"
    )
    monkeypatch.undo()
    assert post(url, {"class_name": "one", "n": 1, **SETTINGS})[0] == 200


def health(url) -> dict:
    return json.loads(get(url, "/health")[1])


def test_a_request_whose_client_disconnects_while_queued_is_not_computed(parts):
    # its batch (8 samples with padding) would start after 5 s; a request of max_batch samples
    # starts one at once
    with serving(parts, max_wait_ms=5000, max_batch=16) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"class_name": "two", "n": 1, **SETTINGS}).encode()
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                           b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            time.sleep(0.05)  # and the client gives up
        waited = 0.0
        while health(url)["queued"] and waited < 4:  # the server sees the disconnect
            time.sleep(0.02)
            waited += 0.02
        assert health(url)["queued"] == 0
        status, headers, _ = post(url, {"class_name": "one", "n": 16, **SETTINGS})
        assert status == 200 and headers["X-Kind-Batch"] == "1"  # the first batch: its own
        assert headers["X-Kind-Batch-Samples"] == "16" and health(url)["samples"] == 16


def test_health_model_cache_page_and_png(url):
    kind, body = get(url, "/health")
    assert kind == "application/json" and json.loads(body)["status"] == "ok"
    model = json.loads(get(url, "/model")[1])
    assert [c["name"] for c in model["classes"]] == NAMES and model["model"]["size"] == "tiny"
    assert model["limits"]["steps"] == [1, 1000] and model["sizes"]["tailor"]["bytes"] > 0
    cache = json.loads(get(url, "/cache")[1])
    assert {"capacity", "loaded", "hits", "misses", "evictions", "bytes"} <= set(cache)
    kind, page = get(url, "/")
    assert kind == "text/html" and b"<title>kind-dit serve</title>" in page
    assert b'fetch("/generate"' in page and b'fetch("/cache")' in page
    status, headers, png = post(url, {"class_name": "zero", "n": 2, **SETTINGS})
    assert status == 200 and headers.get_content_type() == "image/png"
    assert png.startswith(b"\x89PNG")


def test_cli_errors_are_one_line(parts, tmp_path, capsys):
    for args, message in [
        ([str(tmp_path / "nowhere")], "is not a directory"),
        ([str(tmp_path)], "is not a parts directory"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["serve", *args])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            main(["serve", str(parts), "--port", str(port)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"cannot listen on 127.0.0.1:{port}" in err
    assert "Traceback" not in err


def test_vae_option_decodes_a_latent_models_samples_with_that_vae(
    parts, tmp_path, vae_dir, monkeypatch, capsys
):
    copy = shutil.copytree(parts, tmp_path / "parts")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["latent"] = {"vae": str(tmp_path / "gone")}  # trained where the VAE was elsewhere
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as e:
        main(["serve", str(copy), "--port", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "gone does not exist" in err and "--vae PATH" in err
    served = []

    def serve(app, sock):
        served.append(app)
        sock.close()

    monkeypatch.setattr("kind.serve.server.run", serve)
    main(["serve", str(copy), "--port", "0", "--vae", str(vae_dir)])
    decode = served[0].state.batcher.decode
    assert decode(torch.zeros(1, 4, 4, 4)).shape == (1, 3, 8, 8)  # the tiny VAE's upsampling
    with pytest.raises(SystemExit) as e:  # a pixel-space model: no VAE decodes its images
        main(["serve", str(parts), "--port", "0", "--vae", str(vae_dir)])
    assert e.value.code == 2 and "pixel-space model" in capsys.readouterr().err


def test_parts_of_tailor_rank_0_with_a_null_tailor_serve_what_kind_dit_sample_draws(tmp_path):
    torch.manual_seed(0)
    model = DiT(ModelConfig(class_names=NAMES, rank_tailor=0, null_tailor=True))
    parts = decompose(model.eval(), DiffusionConfig(), tmp_path / "parts")
    with serving(parts, max_wait_ms=10) as url:
        status, _, body = post(url, {"class_name": "one", "n": 2, "seed": 3, **SETTINGS},
                               accept="application/x-npz")  # fmt: skip
    assert status == 200
    assert np.array_equal(images(body), sample_cli(parts, tmp_path / "cli", "one", 2, 3))


@pytest.mark.parametrize(
    "accept, npz",
    [
        ("application/x-npz", True),
        ("application/x-npz, image/png;q=0.5", True),
        ("application/x-npz;q=0, image/png", False),  # a substring test answered npz
        ("image/png, application/x-npz;q=0.9", False),
        ("*/*", False),
        ("", False),
        ("application/x-npz;q=abc", False),
    ],
)
def test_the_accept_header_is_read_with_its_weights(accept, npz):
    from kind.serve.app import prefers_npz

    assert prefers_npz(accept) == npz
