"""Helpers of the weights-file tests: a local HTTP server, official-format state dicts, a tiny registry."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

import focus_detr
from parity_utils import rule_value

FIXTURE = Path(__file__).parent / "fixtures" / "official_parity"


# --------------------------------------------------------------------------------------------------
# Official-format state dicts: the parity fixture's weight rule, and our small models under official names


def fixture_official_state_dict(folder: Path = FIXTURE) -> dict[str, torch.Tensor]:
    """Every official key of the fixture filled by the rule; alias keys share their canonical key's value."""
    keys = json.loads((folder / "keys.json").read_text())
    manifest = json.loads((folder / "manifest.json").read_text())
    salt = int(keys.get("salt", manifest.get("salt", 0)))
    cache: dict[str, torch.Tensor] = {}
    sd = {}
    for entry in keys["keys"]:
        canonical = entry["canonical"]
        if canonical not in cache:
            cache[canonical] = rule_value(canonical, entry["shape"], salt)
        sd[entry["key"]] = cache[canonical]
    return sd


# Our names -> official detrex names (focus encoder), to write official-format files of small presets.

_OURS_TO_OFFICIAL = [
    (r"^level_embed$", "transformer.level_embeds"),
    (r"^foreground_selector\.alpha$", "transformer.alpha"),
    (r"^target_embed\.weight$", "transformer.tgt_embed.weight"),
    (r"^token_proj\.(.*)$", r"transformer.enc_output.\1"),
    (r"^token_proj_norm\.(.*)$", r"transformer.enc_output_norm.\1"),
    (r"^foreground_selector\.score_net\.norm\.(.*)$", r"transformer.enc_mask_predictor.layer1.0.\1"),
    (r"^foreground_selector\.score_net\.proj\.(.*)$", r"transformer.enc_mask_predictor.layer1.1.\1"),
    (r"^foreground_selector\.score_net\.head\.(\d)\.(.*)$", r"transformer.enc_mask_predictor.layer2.\1.\2"),
    (r"^(encoder|decoder)\.layers\.(\d+)\.ffn\.linear1\.(.*)$", r"transformer.\1.layers.\2.ffns.0.layers.0.0.\3"),
    (r"^(encoder|decoder)\.layers\.(\d+)\.ffn\.linear2\.(.*)$", r"transformer.\1.layers.\2.ffns.0.layers.1.\3"),
    (r"^decoder\.layers\.(\d+)\.self_attn\.(.*)$", r"transformer.decoder.layers.\1.attentions.0.attn.\2"),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.(.*)$", r"transformer.decoder.layers.\1.attentions.1.\2"),
    (r"^decoder\.layers\.(\d+)\.self_attn_norm\.(.*)$", r"transformer.decoder.layers.\1.norms.0.\2"),
    (r"^decoder\.layers\.(\d+)\.cross_attn_norm\.(.*)$", r"transformer.decoder.layers.\1.norms.1.\2"),
    (r"^decoder\.layers\.(\d+)\.ffn_norm\.(.*)$", r"transformer.decoder.layers.\1.norms.2.\2"),
    (r"^decoder\.(ref_point_head|norm)\.(.*)$", r"transformer.decoder.\1.\2"),
    (r"^encoder\.layers\.(\d+)\.oesm_attn\.(.*)$", r"transformer.encoder.layers.\1.attentions.0.attn.\2"),
    (r"^encoder\.layers\.(\d+)\.cross_attn\.(.*)$", r"transformer.encoder.layers.\1.attentions.1.\2"),
    (r"^encoder\.layers\.(\d+)\.oesm_norm\.(.*)$", r"transformer.encoder.layers.\1.norm2.\2"),
    (r"^encoder\.layers\.(\d+)\.cross_attn_norm\.(.*)$", r"transformer.encoder.layers.\1.norms.0.\2"),
    (r"^encoder\.layers\.(\d+)\.ffn_norm\.(.*)$", r"transformer.encoder.layers.\1.norms.1.\2"),
    (r"^dn_label_embed\.weight$", "label_enc.weight"),
    (r"^class_heads\.(\d+)\.(.*)$", r"class_embed.\1.\2"),
    (r"^box_heads\.(\d+)\.(.*)$", r"bbox_embed.\1.\2"),
    (r"^(backbone|neck)\.(.*)$", r"\1.\2"),
]


def official_checkpoint(model: focus_detr.FocusDETR) -> dict:
    """``{"model": state dict under official names (with the alias copies), "iteration": 0}``."""
    n_dec, n_enc = model.cfg.decoder.num_layers, model.cfg.encoder.num_layers
    sd: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        head = re.match(r"^proposal_(class|box)_head\.(.*)$", key)
        if head:
            new = f"{'class' if head.group(1) == 'class' else 'bbox'}_embed.{n_dec}.{head.group(2)}"
        else:
            new = next(re.sub(p, r, key) for p, r in _OURS_TO_OFFICIAL if re.match(p, key))
        sd[new] = value.clone()
    for key in list(sd):
        m = re.match(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$", key)
        if m:
            sd[f"transformer.decoder.{key}"] = sd[key]
            if m.group(1) == "class_embed" and int(m.group(2)) == n_dec:
                for i in range(n_enc):
                    sd[f"enhance_MCSP_layerlist.{i}.{m.group(3)}"] = sd[key]
                    sd[f"transformer.encoder.enhance_MCSP.{i}.{m.group(3)}"] = sd[key]
    return {"model": sd, "iteration": 0}



def official_from_ours(model) -> dict[str, torch.Tensor]:
    """``model``'s weights under the official detrex key names, alias copies included (``{"model": ...}``
    content)."""
    return official_checkpoint(model)["model"]


# --------------------------------------------------------------------------------------------------
# A local HTTP server (127.0.0.1 only) with Range support, request log and a "cut the first response" switch


class FileServer:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1; ``cut_once`` paths send half of their bytes on the
    first request and close the connection (a dropped download)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_once: set[str] = set()
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, status)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                data = server.files.get(self.path)
                rng = self.headers.get("Range")
                if data is None:
                    server.requests.append((self.path, rng, 404))
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng:
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                server.requests.append((self.path, rng, 206 if rng else 200))
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.cut_once:
                    server.cut_once.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_registry(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"models": entries}))
    return path
