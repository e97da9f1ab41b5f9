"""Every route of `clipdb serve` and every error status, over real HTTP."""
import io
import json
import os
import signal

import pytest

from serverlib import TOKEN, Server, run

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def image_ids(server):
    st, res = server.json("POST", "/api/search", {"text": "anything", "k": 100})
    assert st == 200
    return sorted(r["id"] for r in res["results"])


# ---- health, metrics, stats, OpenAPI, the page ----

def test_healthz(server):
    st, body = server.json("GET", "/healthz")
    assert (st, body) == (200, {"status": "ok"})


def test_stats(server):
    st, s = server.json("GET", "/api/stats")
    assert st == 200
    assert (s["images"], s["captions"], s["texts"]) == (6, 12, 14)
    assert s["vector_sets"] == ["base"] and s["writable"] is True and s["readonly"] is False
    assert s["model"].startswith("clip-") and s["embed_dim"] > 0
    assert any(i["kind"] == "ivf" and i["target"] == "image" for i in s["indexes"])


def test_metrics_count_requests_and_items(server):
    server.json("GET", "/healthz")
    server.json("GET", "/api/nope")
    st, hd, body = server.request("GET", "/metrics")
    assert st == 200 and hd["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert 'clipdb_http_requests_total{method="GET",route="/healthz",code="200"}' in text
    assert 'route="unmatched",code="404"' in text
    assert 'clipdb_items{type="image"} 6' in text
    assert "clipdb_http_request_duration_seconds_bucket" in text
    errors = [l for l in text.splitlines() if l.startswith("clipdb_http_errors_total ")]
    assert errors and int(errors[0].split()[1]) >= 1


def test_openapi_lists_every_route(server):
    st, doc = server.json("GET", "/api/openapi.json")
    assert st == 200 and doc["openapi"].startswith("3.")
    for p in ["/healthz", "/metrics", "/api/stats", "/api/search", "/api/items", "/api/items/{id}",
              "/api/items/{id}/image", "/api/items/{id}/thumb", "/api/eval", "/api/eval/report"]:
        assert p in doc["paths"], p


def test_page_and_assets(server):
    st, hd, body = server.request("GET", "/")
    assert st == 200 and hd["Content-Type"].startswith("text/html") and b"<title>clipdb" in body
    assert "default-src 'self'" in hd["Content-Security-Policy"]
    assert hd["X-Content-Type-Options"] == "nosniff"
    assert "Access-Control-Allow-Origin" not in hd  # no CORS unless asked
    for name, mime in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        st, hd, body = server.request("GET", "/" + name)
        assert st == 200 and hd["Content-Type"].startswith(mime) and len(body) > 100
    assert server.request("GET", "/missing.js")[0] == 404
    assert server.request("GET", "/.hidden")[0] == 404


# ---- search ----

def test_search_text_matches_the_cli(server, base_db):
    st, res = server.json("POST", "/api/search", {"text": "a red square", "k": 4})
    assert st == 200
    cli = json.loads(run("search", base_db, "--text", "a red square", "-k", "4", "--json", check=True).stdout)
    assert len(res["results"]) == 4
    for a, b in zip(res["results"], cli["results"]):
        sa, sb = a.pop("score"), b.pop("score")
        assert a == b
        assert abs(sa - sb) < 1e-6
    t = res["timings"]
    assert t["encode_ms"] > 0 and t["search_ms"] >= 0
    assert abs(t["encode_ms"] + t["search_ms"] - res["took_ms"]) < 1e-6
    assert res["query"] == {"kind": "text", "target": "image", "k": 4, "metric": "cosine",
                            "index": "exact", "vectors": "base"}


def test_search_scores_sorted_and_metric_changes_them(server):
    scores = {}
    for m in ["cosine", "dot", "l2"]:
        st, res = server.json("POST", "/api/search", {"text": "a dog", "k": 6, "metric": m})
        assert st == 200 and len(res["results"]) == 6
        s = [r["score"] for r in res["results"]]
        assert s == sorted(s, reverse=True)
        scores[m] = s
    assert scores["cosine"] != scores["dot"] != scores["l2"]
    assert all(x <= 0 for x in scores["l2"])
    assert all(-1.0001 <= x <= 1.0001 for x in scores["cosine"])


def test_search_image_upload_to_text(server, base_db):
    photo = (base_db.parent / "images" / "photo1.jpg").read_bytes()
    st, res = server.form("/api/search", [("target", "text"), ("k", "3")], [("image", "p.jpg", photo)])
    assert st == 200, res
    assert len(res["results"]) == 3 and all(r["type"] == "text" for r in res["results"])
    cli = json.loads(run("search", base_db, "--image", base_db.parent / "images" / "photo1.jpg",
                         "--target", "text", "-k", "3", "--json", check=True).stdout)
    assert [r["id"] for r in res["results"]] == [r["id"] for r in cli["results"]]
    assert res["query"]["kind"] == "image"


def test_search_by_item_finds_itself_first(server):
    ids = image_ids(server)
    st, res = server.json("POST", "/api/search", {"item": ids[2], "k": 3})
    assert st == 200 and res["results"][0]["id"] == ids[2]
    assert abs(res["results"][0]["score"] - 1) < 1e-5
    # an item id as a form/string value works too
    st, res2 = server.json("POST", "/api/search", {"item": str(ids[2]), "k": 3})
    assert st == 200 and res2["results"] == res["results"]


def test_search_text_to_text_with_filter(server):
    st, res = server.json("POST", "/api/search", {"text": "photo", "target": "text", "k": 20,
                                                  "where": ["split=val"]})
    assert st == 200 and len(res["results"]) == 6
    assert all(r["split"] == "val" and r["type"] == "text" for r in res["results"])
    st, res2 = server.json("POST", "/api/search", {"text": "photo", "target": "text", "k": 20,
                                                   "where": {"split": "val"}})
    assert st == 200 and res2["results"] == res["results"]


def test_search_ivf_with_all_lists_equals_exact(server):
    q = {"text": "green", "k": 5}
    st, exact = server.json("POST", "/api/search", q)
    st2, ivf = server.json("POST", "/api/search", dict(q, index="ivf", nprobe=2))
    assert st == st2 == 200
    assert [r["id"] for r in ivf["results"]] == [r["id"] for r in exact["results"]]
    assert ivf["query"]["nprobe"] == 2


def test_search_faiss_in_memory_or_refused(server):
    st, res = server.json("POST", "/api/search", {"text": "x", "index": "faiss"})
    # no stored Faiss index in this database: refused with a reason, not a crash
    assert st in (400, 404) and "faiss" in res["error"].lower(), res


@pytest.mark.parametrize("body,status,needle", [
    ({}, 400, "exactly one"),
    ({"text": "a", "item": 1}, 400, "exactly one"),
    ({"text": 5}, 400, "string"),
    ({"text": "a", "k": 0}, 400, "'k'"),
    ({"text": "a", "k": 1001}, 400, "'k'"),
    ({"text": "a", "k": "ten"}, 400, "'k'"),
    ({"text": "a", "k": 2.5}, 400, "'k'"),
    ({"text": "a", "metric": "manhattan"}, 400, "metric"),
    ({"text": "a", "target": "video"}, 400, "'target' is image or text"),
    ({"text": "a", "target": 1}, 400, "'target' is image or text"),
    ({"text": "a", "index": "hnsw"}, 400, "'index' is exact, ivf or faiss"),
    ({"text": "a", "index": None}, 400, "'index' is exact, ivf or faiss"),
    ({"text": "a", "index": "ivf", "nprobe": 0}, 400, "'nprobe' must be an integer from 1 to"),
    ({"text": "a", "vectors": "finetuned"}, 404, "no vector set 'finetuned'"),
    ({"text": "a", "space": "finetuned"}, 404, "no vector set 'finetuned'"),
    ({"text": "a", "space": ""}, 400, "'space'"),
    ({"text": "a", "space": 3}, 400, "'space'"),
    ({"text": "a", "where": ["nofield"]}, 400, "FIELD=VALUE"),
    ({"text": "a", "where": 7}, 400, "where"),
    ({"item": -3}, 400, "item"),
    ({"item": 987654321}, 404, ""),
    ({"text": "x" * 3000}, 413, "bytes"),
])
def test_search_errors(server, body, status, needle):
    st, res = server.json("POST", "/api/search", body)
    assert st == status, res
    assert res["status"] == status and needle in res["error"]


def test_search_wrong_content_type_and_bad_json(server):
    st, hd, b = server.request("POST", "/api/search", b"text=a", {"Content-Type": "text/plain"})
    assert st == 415
    st, hd, b = server.request("POST", "/api/search", b"{\"text\": ", {"Content-Type": "application/json"})
    assert st == 400 and b"malformed" in b
    st, hd, b = server.request("POST", "/api/search", b"[1,2]", {"Content-Type": "application/json"})
    assert st == 400 and b"object" in b


def test_search_bad_uploads(server):
    st, res = server.form("/api/search", [], [("image", "x.jpg", b"this is not an image")])
    assert st == 422, res
    # the upload went through the search's in-memory image queries: its decoder's
    # status, the query named by its index
    assert res["error"].startswith("query 0: ") and "more image queries" not in res["error"], res
    st, res = server.form("/api/search", [], [("image", "x.jpg", b"")])
    assert st == 422, res
    st, res = server.form("/api/search", [], [("image", "x.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 50)])
    assert st == 422, res


def test_method_not_allowed_and_unknown_route(server):
    st, hd, b = server.request("GET", "/api/search")
    assert st == 405 and hd["Allow"] == "POST"
    st, hd, b = server.request("PUT", "/api/items/1")
    assert st == 405 and "GET" in hd["Allow"] and "DELETE" in hd["Allow"]
    assert server.request("GET", "/api/nothing")[0] == 404
    assert server.request("GET", "/api/items/abc")[0] == 404
    st, hd, b = server.request("GET", "/api/stats", b"{}", {"Content-Type": "application/json"})
    assert st == 400


# ---- items ----

def test_item_image_thumb(server, base_db):
    from PIL import Image
    st, res = server.json("POST", "/api/search", {"text": "x", "k": 1})
    iid = res["results"][0]["id"]
    st, d = server.json("GET", f"/api/items/{iid}")
    assert st == 200 and d["item"]["type"] == "image" and len(d["captions"]) == 2
    assert all(c["image"] == iid for c in d["captions"])
    st, hd, body = server.request("GET", f"/api/items/{iid}/image")
    assert st == 200 and hd["Content-Type"] == "image/jpeg"
    assert body == open(d["item"]["abspath"], "rb").read()
    st, hd, body = server.request("GET", f"/api/items/{iid}/thumb")
    assert st == 200 and hd["Content-Type"] == "image/jpeg"
    im = Image.open(io.BytesIO(body))
    assert im.size[0] == im.size[1] > 0
    st2, hd2, body2 = server.request("GET", f"/api/items/{iid}/thumb")  # from the cache
    assert st2 == 200 and body2 == body
    cap = d["captions"][0]["id"]
    st, d2 = server.json("GET", f"/api/items/{cap}")
    assert st == 200 and d2["item"]["text"] == d["captions"][0]["text"] and d2["captions"] == []
    assert server.request("GET", f"/api/items/{cap}/image")[0] == 404
    assert server.request("GET", f"/api/items/{cap}/thumb")[0] == 404
    assert server.request("GET", "/api/items/987654321")[0] == 404
    assert server.request("GET", "/api/items/987654321/thumb")[0] == 404


def test_symlinked_file_is_not_served(start_server, db_copy, tmp_path):
    s = start_server(db_copy)
    st, res = s.json("POST", "/api/search", {"text": "x", "k": 1})
    d = s.json("GET", f"/api/items/{res['results'][0]['id']}")[1]
    path = d["item"]["abspath"]
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the web")
    os.unlink(path)
    os.symlink(secret, path)
    for what in ["image", "thumb"]:
        st, hd, body = s.request("GET", f"/api/items/{d['item']['id']}/{what}")
        assert st == 404 and b"not for the web" not in body
    os.unlink(path)
    st, hd, body = s.request("GET", f"/api/items/{d['item']['id']}/image")
    assert st == 404


# ---- writes ----

def test_writes_need_the_token(start_server, db_copy):
    s = start_server(db_copy, "--token", TOKEN)
    st, res = s.json("POST", "/api/items", {"text": "hello"})
    assert st == 401
    st, res = s.json("POST", "/api/items", {"text": "hello"}, {"Authorization": "Bearer wrong-token-012345678"})
    assert st == 401
    st, res = s.json("POST", "/api/items", {"text": "hello"}, {"Authorization": f"Bearer {TOKEN}x"})
    assert st == 401
    assert s.request("DELETE", "/api/items/1")[0] == 401
    assert s.json("GET", "/api/stats")[1]["texts"] == 12


def test_writes_refused_without_token_or_read_only(start_server, db_copy):
    s = start_server(db_copy)
    st, res = s.json("POST", "/api/items", {"text": "hello"}, AUTH)
    assert st == 403 and "--token" in res["error"]
    s2 = start_server(db_copy, "--token", TOKEN, "--read-only")
    st, res = s2.json("POST", "/api/items", {"text": "hello"}, AUTH)
    assert st == 403 and "read-only" in res["error"]
    st, hd, b = s2.request("DELETE", "/api/items/1", headers=AUTH)
    assert st == 403
    assert s2.json("GET", "/api/stats")[1]["readonly"] is True


def test_add_and_delete(start_server, db_copy, base_db):
    from PIL import Image
    s = start_server(db_copy, "--token", TOKEN)
    buf = io.BytesIO()
    Image.new("RGB", (120, 80), (120, 10, 160)).save(buf, "PNG")  # unlike any stored photo
    photo = buf.getvalue()
    st, res = s.form("/api/items", [("caption", "an uploaded photo"), ("caption", "its second caption")],
                     [("image", "up.jpg", photo)], AUTH)
    assert st == 201, res
    new = res["id"]
    assert res["captions"] == 2
    st, d = s.json("GET", f"/api/items/{new}")
    assert st == 200 and [c["text"] for c in d["captions"]] == ["an uploaded photo", "its second caption"]
    st, hd, body = s.request("GET", f"/api/items/{new}/image")
    assert st == 200 and body == photo and hd["Content-Type"] == "image/png"
    st, res = s.json("POST", "/api/search", {"item": new, "k": 1})
    assert res["results"][0]["id"] == new
    st, res = s.json("POST", "/api/search", {"text": "an uploaded photo", "target": "text", "k": 30})
    assert any(r["text"] == "an uploaded photo" for r in res["results"])
    # a text
    st, res = s.json("POST", "/api/items", {"text": "a text through the API"}, AUTH)
    assert st == 201 and res["type"] == "text"
    tid = res["id"]
    st, res = s.json("POST", "/api/items", {"text": "a text through the API"}, AUTH)
    assert st == 409
    # bad inputs
    st, res = s.form("/api/items", [], [("image", "bad.jpg", b"GIF89a not really")], AUTH)
    assert st == 422
    st, res = s.json("POST", "/api/items", {"text": "two\nlines"}, AUTH)
    assert st == 400
    st, res = s.json("POST", "/api/items", {}, AUTH)
    assert st == 400
    # delete
    st, res = s.json("DELETE", f"/api/items/{new}", headers=AUTH)
    assert st == 200 and res == {"deleted": new, "captions": 2}
    assert s.request("GET", f"/api/items/{new}")[0] == 404
    assert s.request("GET", f"/api/items/{new}/thumb")[0] == 404
    assert s.request("DELETE", f"/api/items/{new}", headers=AUTH)[0] == 404
    assert s.request("DELETE", f"/api/items/{tid}", headers=AUTH)[0] == 200
    st, stats = s.json("GET", "/api/stats")
    assert (stats["images"], stats["captions"], stats["texts"]) == (6, 12, 12)


def png_bytes(w, h):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (30, 140, 60)).save(buf, "PNG")
    return buf.getvalue()


def gif_declaring(w, h):
    """A 1 x 1 GIF whose logical screen claims w x h pixels: 799 bytes that a
    decoder without a limit turns into w * h * 3 bytes of canvas."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("P", (1, 1)).save(buf, "GIF")
    b = bytearray(buf.getvalue())
    b[6:10] = w.to_bytes(2, "little") + h.to_bytes(2, "little")
    return bytes(b)


def test_upload_pixel_limit(start_server, db_copy):
    """--max-image-pixels: an upload (query or item) of more pixels gets 413
    and nothing is stored; one of exactly the limit is served; stored items
    are not limited; the default server refuses a small GIF declaring
    13000 x 13000 (169 MP) at once."""
    s = start_server(db_copy, "--token", TOKEN, "--max-image-pixels", "4800")
    st, stats = s.json("GET", "/api/stats")
    assert st == 200 and stats["max_image_pixels"] == 4800
    before = stats["images"]
    st, res = s.form("/api/search", [("k", "3")], [("image", "big.png", png_bytes(81, 60))])
    assert st == 413 and "81x60" in res["error"] and "4800 pixels in all" in res["error"], res
    st, res = s.form("/api/search", [("k", "3")], [("image", "ok.png", png_bytes(80, 60))])
    assert st == 200 and len(res["results"]) == 3, res
    st, res = s.form("/api/items", [("caption", "too big")], [("image", "big.png", png_bytes(81, 60))], AUTH)
    assert st == 413 and "4800 pixels in all" in res["error"], res
    assert s.json("GET", "/api/stats")[1]["images"] == before
    st, res = s.form("/api/items", [("caption", "fits")], [("image", "ok.png", png_bytes(80, 60))], AUTH)
    assert st == 201, res
    # stored photos (generated larger than the limit) keep their thumbnails
    st, res = s.json("POST", "/api/search", {"text": "x", "k": 1})
    assert s.request("GET", f"/api/items/{res['results'][0]['id']}/thumb")[0] == 200
    d = start_server(db_copy)
    assert d.json("GET", "/api/stats")[1]["max_image_pixels"] == 64000000
    bomb = gif_declaring(13000, 13000)
    assert len(bomb) < 1024
    st, res = d.form("/api/search", [("k", "1")], [("image", "bomb.gif", bomb)])
    assert st == 413 and "13000x13000" in res["error"], res
    for bad in ("0", "178956971", "x"):
        p = run("serve", db_copy, "--max-image-pixels", bad)
        assert p.returncode == 2 and "--max-image-pixels" in p.stderr, (bad, p.stderr)


def test_cors_only_when_asked(start_server, db_copy):
    s = start_server(db_copy, "--cors", "http://example.test")
    st, hd, b = s.request("GET", "/api/stats")
    assert hd["Access-Control-Allow-Origin"] == "http://example.test"
    st, hd, b = s.request("OPTIONS", "/api/search")
    assert st == 204


# ---- the command ----

def test_serve_usage_errors(base_db, tmp_path):
    p = run("serve")
    assert p.returncode == 2
    p = run("serve", base_db, "--port", "99999")
    assert p.returncode == 2
    p = run("serve", tmp_path / "none.db", "--port", "0")
    assert p.returncode == 1 and "no such database" in p.stderr
    p = run("serve", base_db, "--port", "0", "--bind", "not-an-ip")
    assert p.returncode == 1 and "bind" in p.stderr
    p = run("serve", base_db, "--port", "0", "--token", "short")
    assert p.returncode == 1 and "8 characters" in p.stderr
    p = run("serve", "--help")
    assert p.returncode == 0 and "--read-only" in p.stdout and "examples" in p.stdout


def test_port_in_use(start_server, base_db):
    s = start_server(base_db)
    p = run("serve", base_db, "--port", s.port, timeout=30)
    assert p.returncode == 1 and "cannot listen" in p.stderr


def test_sigint_stops_cleanly(base_db):
    s = Server(base_db)
    assert s.json("GET", "/healthz")[0] == 200
    s.proc.send_signal(signal.SIGINT)
    rc, err = s.stop()
    assert rc == 0 and "stopping" in err
    assert "GET /healthz 200" in err


# ---- evaluation ----

def test_eval_figures_and_report(start_server, db_copy, base_db):
    s = start_server(db_copy, "--token", TOKEN)
    st, ev = s.json("GET", "/api/eval")
    assert st == 200, ev
    assert (ev["images"], ev["captions"]) == (6, 12)
    assert 0 <= ev["t2i"]["R@1"] <= ev["t2i"]["R@5"] <= 1 and ev["i2t"]["median_rank"] >= 1
    # the same figures as `clipdb eval --json` (the date and timings aside)
    cli = json.loads(run("eval", db_copy, "--json", "-k", "1,5", "--index-k", "6", check=True).stdout)
    assert ev["t2i"] == cli["t2i"] and ev["i2t"] == cli["i2t"]
    st, hd, body = s.request("GET", "/api/eval/report")
    assert st == 200 and hd["Content-Type"].startswith("text/html") and b"<html" in body.lower()
    assert "frame-ancestors 'self'" in hd["Content-Security-Policy"] and hd["X-Frame-Options"] == "SAMEORIGIN"
    # a write makes the next evaluation see it
    st, res = s.form("/api/items", [("caption", "a new caption")],
                     [("image", "n.jpg", (base_db.parent / "images" / "photo0.jpg").read_bytes())], AUTH)
    assert st == 201
    st, ev2 = s.json("GET", "/api/eval")
    assert st == 200 and (ev2["images"], ev2["captions"]) == (7, 13)


def test_eval_of_a_database_without_captions(start_server, tmp_path, base_db):
    db = tmp_path / "nocaps.db"
    run("init", db, "--model", base_db.parent / "model", check=True)
    run("add", db, "--texts", base_db.parent / "texts.txt", check=True)
    s = start_server(db)
    st, res = s.json("GET", "/api/eval")
    assert st == 409 and "evaluation" in res["error"]
    assert s.request("GET", "/api/eval/report")[0] == 409
