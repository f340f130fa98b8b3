"""Rollouts and self-scores on `dynalign serve` engines (serving/rollout.py): the learner holds
only the trainer, and the engine that serves users also rolls out, behind them.

    learner ──PUT adapters/rollout-<run>-policy-N──▶ replica (loads <registry.rollout_dir>/<name>)
            ──POST v1/chat/completions (n=G)──────▶ candidates with token ids
            ──POST (max_tokens=1, logprob_token_ids=["0".."5"])──▶ the digits' log-probs

Each request is sent to the current endpoint; one that cannot be reached or answers 5xx makes
the next endpoint current, and only the requests that failed are sent again there (adapters are
loaded on an endpoint the first time a request there needs them). A replica killed mid-rollout
costs those requests a retry, not the step. The score is the in-process engine's estimator:
vLLM's raw next-token log-probs of the six digits, renormalised over them, equal the processed
log-probs after `allowed_token_ids` masks the rest (tests/test_served_engine.py checks both
against the model's own logits).
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from learner import metrics
from learner.rollout import Completion, Engine, Sampling
from shared.config import DynalignConfig

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per rollout request

# A request at rollout priority waits behind every user's; on a busy CPU a step's rollouts take
# minutes, so only a connection that makes no progress for this long counts as failed.
READ_TIMEOUT_S = 900.0
# After every endpoint failed in a row, wait this long before the next round (a replica
# restarting under a supervisor takes ~30 s on the tiny model); give up after GIVE_UP_S.
ROUND_PAUSE_S = 2.0
GIVE_UP_S = 600.0


class EndpointFailed(Exception):
    """This endpoint cannot answer now (unreachable, 5xx, or it lost our adapter)."""


class RolloutRefused(RuntimeError):
    """An endpoint refused a request as malformed (4xx): retrying elsewhere would not help."""


@dataclass(frozen=True)
class ServedLora:
    name: str  # "rollout-<session>-<prefix>-<n>": unique per learner process
    lora_path: Path  # under registry.rollout_dir, which the servers read


class ServedEngine(Engine):
    def __init__(self, cfg: DynalignConfig, workdir: Path) -> None:
        from transformers import AutoTokenizer

        from shared.models import resolve_model_path

        lc = cfg.learner
        self.endpoints = [url.rstrip("/") for url in lc.rollout_endpoints]
        token = lc.rollout_token.get_secret_value() if lc.rollout_token else ""
        self._headers = {"Authorization": f"Bearer {token}"}
        self._current = 0
        self._loaded: dict[str, set[str]] = {url: set() for url in self.endpoints}
        self.rollout_dir = cfg.registry.rollout_dir
        self.rollout_dir.mkdir(parents=True, exist_ok=True)
        self._session = uuid.uuid4().hex[:8]  # names stay unique across learner restarts
        self.base_name = cfg.model.served_name
        self.failovers = 0
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model))
        super().__init__(lc, workdir, tokenizer, self._max_model_len())
        log.info("rolling out on %s", ", ".join(self.endpoints))

    # -- Engine's primitives
    def lora_request(self, path: Path, prefix: str = "adapter") -> ServedLora:
        lora = self._new_lora(prefix)
        shutil.copytree(path, lora.lora_path)
        return lora

    def load_policy(self, save: Callable[[Path], None]) -> None:
        """Saved straight into the shared directory (no copy per step)."""
        lora = self._new_lora("policy")
        save(lora.lora_path)
        previous, self.lora = self.lora, lora
        self.drop(previous)

    def drop(self, lora: ServedLora | None) -> None:
        if lora is None:
            return
        for url in self.endpoints:
            if lora.name in self._loaded[url]:
                self._loaded[url].discard(lora.name)
                try:
                    response = httpx.delete(
                        f"{url}/admin/rollout/adapters/{lora.name}", headers=self._headers
                    )
                    if response.status_code not in (204, 404):
                        log.warning("evicting %s on %s: %s", lora.name, url, response.text)
                except httpx.TransportError as exc:  # gone with the replica
                    log.info("evicting %s on %s: %s", lora.name, url, exc)
        shutil.rmtree(lora.lora_path, ignore_errors=True)

    def generate(self, conversations, sampling: Sampling, lora) -> list[list[Completion]]:
        bodies = [
            {
                "messages": messages,
                "n": sampling.n,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens,
                # Exactly the policy's distribution: no sampling defaults of the model's
                # generation_config, which vLLM's server applies to fields a request leaves out.
                "top_k": 0,
                "min_p": 0.0,
                "repetition_penalty": 1.0,
                "return_token_ids": True,
            }
            for messages in conversations
        ]
        return [
            [
                Completion(list(c["token_ids"]), c["message"]["content"] or "", c["finish_reason"])
                for c in sorted(response["choices"], key=lambda c: c["index"])
            ]
            for response in self._chat_all(bodies, lora)
        ]

    def token_distribution(self, requests, token_ids: list[int], lora) -> list[tuple[float, ...]]:
        bodies = [
            {
                "messages": messages,
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": True,
                "logprob_token_ids": token_ids,
                "return_tokens_as_token_ids": True,  # "token_id:37": no decoding to match
            }
            for messages in requests
        ]
        dists = []
        for response in self._chat_all(bodies, lora):
            step = response["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            logprobs = {int(t["token"].removeprefix("token_id:")): t["logprob"] for t in step}
            probs = [math.exp(logprobs[t]) if t in logprobs else 0.0 for t in token_ids]
            total = sum(probs)
            dists.append(tuple(p / total if total > 0 else 0.0 for p in probs))
        return dists

    def shutdown(self) -> None:
        self.drop(self.lora)
        self.lora = None

    # -- requests
    def _new_lora(self, prefix: str) -> ServedLora:
        name = f"rollout-{self._session}-{prefix}-{next(self._ids)}"
        return ServedLora(name, self.rollout_dir / name)

    def _max_model_len(self) -> int:
        def ask(client: httpx.Client, url: str) -> int:
            response = client.get(f"{url}/v1/models", headers=self._headers)
            if response.status_code >= 500:
                raise EndpointFailed(response.text)
            response.raise_for_status()
            return response.json()["data"][0]["max_model_len"]

        with httpx.Client(timeout=30) as client:
            return self._with_failover(lambda url: ask(client, url))

    def _with_failover(self, call: Callable[[str], Any]) -> Any:
        """call(url) on the current endpoint, then on the next ones, round after round."""
        deadline = time.monotonic() + GIVE_UP_S
        while True:
            for _ in self.endpoints:
                url = self.endpoints[self._current]
                try:
                    return call(url)
                except (EndpointFailed, httpx.TransportError) as exc:
                    self._fail(url, exc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no rollout endpoint answered for {GIVE_UP_S:.0f} s")
            time.sleep(ROUND_PAUSE_S)

    def _fail(self, url: str, exc: Exception) -> None:
        if self.endpoints[self._current] == url:
            self._current = (self._current + 1) % len(self.endpoints)
            self.failovers += 1
            metrics.ROLLOUT_FAILOVERS.inc()
            if self._loaded[url] or len(self.endpoints) > 1 or self.failovers == 1:
                log.warning("rollout endpoint %s failed (%s); now %s", url, exc, self._current_url)
        self._loaded[url].clear()  # a restarted replica has none of our adapters

    @property
    def _current_url(self) -> str:
        return self.endpoints[self._current]

    def _chat_all(self, bodies: list[dict], lora: ServedLora | None) -> list[dict]:
        """Every body answered (in order), each retried on the next endpoint until it is."""
        results: list[dict | None] = [None] * len(bodies)
        deadline = time.monotonic() + GIVE_UP_S
        while True:
            pending = [i for i, r in enumerate(results) if r is None]
            if not pending:
                return results  # type: ignore[return-value]
            url = self._current_url
            answered = asyncio.run(self._send(url, [bodies[i] for i in pending], lora))
            failure = None
            for i, answer in zip(pending, answered, strict=True):
                if isinstance(answer, Exception):
                    failure = answer
                else:
                    results[i] = answer
            if failure is not None:
                self._fail(url, failure)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no rollout endpoint answered for {GIVE_UP_S:.0f} s")
                if self._current_url == url:  # the only endpoint
                    time.sleep(ROUND_PAUSE_S)

    async def _send(
        self, url: str, bodies: list[dict], lora: ServedLora | None
    ) -> list[dict | Exception]:
        model = lora.name if lora else self.base_name
        timeout = httpx.Timeout(30.0, read=READ_TIMEOUT_S)
        limits = httpx.Limits(max_connections=self.cfg.rollout_concurrency)
        async with httpx.AsyncClient(
            base_url=url, headers=self._headers, timeout=timeout, limits=limits
        ) as client:
            try:
                if lora is not None:
                    await self._ensure_loaded(client, url, lora)
            except (EndpointFailed, httpx.TransportError) as exc:
                return [exc] * len(bodies)
            return await asyncio.gather(
                *(self._post(client, {**body, "model": model}) for body in bodies)
            )

    async def _ensure_loaded(self, client: httpx.AsyncClient, url: str, lora: ServedLora) -> None:
        if lora.name in self._loaded[url]:
            return
        response = await client.put(f"/admin/rollout/adapters/{lora.name}")
        _check(response)
        self._loaded[url].add(lora.name)

    async def _post(self, client: httpx.AsyncClient, body: dict) -> dict | Exception:
        try:
            response = await client.post("/admin/rollout/v1/chat/completions", json=body)
            if response.status_code == 404:  # the replica restarted and lost our adapter
                raise EndpointFailed(response.text)
            _check(response)
            return response.json()
        except (EndpointFailed, httpx.TransportError) as exc:
            return exc


def _check(response: httpx.Response) -> None:
    if response.status_code >= 500:
        raise EndpointFailed(f"{response.status_code}: {response.text[:200]}")
    if response.status_code >= 400:
        raise RolloutRefused(f"{response.request.url}: {response.status_code} {response.text}")
