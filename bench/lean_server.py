"""The leanest server the inference benchmark compares `visionflow serve` with: a bare ASGI app under uvicorn with
visionflow's own HTTP protocol (serving.http's header deadline), nothing else around it.

- `--mode echo`: reads the body and answers a fixed JSON of a prediction's size: what HTTP alone costs per request.
- `--mode inline`: the in-process baseline's work (bench.inference_serving._local_rate: parse the one-file form,
  decode, the model's logits and embedding, softmax) run on the event loop, one request at a time, and its label
  answered. No batching, no prediction log, no metrics, no review queue, no limits: what any server that does the
  baseline's work behind HTTP pays at the least.

`python -m bench.lean_server --port P --mode inline --model model.onnx --size 28 --channels 1` (127.0.0.1 only;
GET /ready answers once it listens)."""

from __future__ import annotations

import argparse
import json
from typing import Any

# A prediction's answer as visionflow serve encodes it (ten classes), for the echo mode's fixed reply.
ECHO = json.dumps(
    {
        "label": "class-0",
        "confidence": 0.1,
        "probabilities": {f"class-{i}": 0.1 for i in range(10)},
        "model_version": "1",
        "review_id": None,
    },
    separators=(",", ":"),
).encode()


def inline_predictor(params: str, model: str, size: int, channels: int):
    """body, content type -> answer bytes: the baseline's work on one upload (one ONNX Runtime thread), under the
    decode rules of `params` (a params.yaml)."""
    from visionflow.config import load_params
    from visionflow.data.imageio import DecodeRules, decode_for_model
    from visionflow.onnxrt import ort_outputs, ort_session, softmax
    from visionflow.serving.multipart import multipart_files

    p = load_params(params)
    rules = DecodeRules.from_params(p.validation, p.serve)
    session = ort_session(model, threads=1)

    def predict(body: bytes, content_type: bytes) -> bytes:
        (data,) = multipart_files(
            body, content_type, max_files=1, max_fields=p.serve.max_form_fields, max_file_bytes=rules.max_bytes
        )
        x = decode_for_model(data, size, channels, rules)
        logits, _embedding = ort_outputs(session, x[None], ("logits", "embedding"), batch_size=None)
        probs = softmax(logits)[0]
        k = int(probs.argmax())
        return json.dumps({"label": k, "confidence": float(probs[k])}, separators=(",", ":")).encode()

    return predict


def app_for(predict) -> Any:
    """The ASGI app: POST bodies go to `predict` (None: the echo reply); any GET answers 200 (readiness)."""

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        status, answer = 200, b'{"status":"ready"}'
        if scope["method"] == "POST":
            content_type = dict(scope["headers"]).get(b"content-type", b"")
            try:
                answer = ECHO if predict is None else predict(b"".join(chunks), content_type)
            except Exception as exc:  # noqa: BLE001 - a bad upload is the client's; the benchmark counts non-200s
                status, answer = 400, json.dumps({"detail": f"{type(exc).__name__}: {exc}"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from visionflow.serving.http import header_deadline_protocol

    ap = argparse.ArgumentParser(prog="python -m bench.lean_server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=("echo", "inline"), required=True)
    ap.add_argument("--model", help="the ONNX model (inline mode)")
    ap.add_argument("--params", default="params.yaml", help="whose decode rules and form limits (inline mode)")
    ap.add_argument("--size", type=int, default=28, help="the model's input side in pixels (inline mode)")
    ap.add_argument("--channels", type=int, choices=(1, 3), default=1, help="(inline mode)")
    args = ap.parse_args(argv)
    if args.mode == "inline" and not args.model:
        ap.error("--mode inline needs --model")
    predict = inline_predictor(args.params, args.model, args.size, args.channels) if args.mode == "inline" else None
    # As visionflow serve runs uvicorn (serving.app.serve_champion), less its access log (off there by default).
    uvicorn.run(
        app_for(predict),
        host="127.0.0.1",
        port=args.port,
        access_log=False,
        http=header_deadline_protocol(10.0),
        timeout_keep_alive=5,
        proxy_headers=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
