"""HTTP API on the WebUI server under /lora-train/v1: caption, train, job status, stop.

Routes use the WebUI API's own basic auth when it runs with --api-auth. Handlers are plain `def`, so FastAPI
runs them in worker threads and the server's event loop never waits on a job; jobs run in their own thread.
A second job while one runs gets 409, a bad body or value 422 naming the field, an unknown job 404.
"""

from __future__ import annotations

from secrets import compare_digest
from typing import Any, Callable, Dict, List, Literal, Optional

from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, Field

from ..captioning import DEFAULT_MODEL, CaptionOptions
from ..tagger import TaggerOptions
from ..jobs import JobBusyError, JobNotFoundError, JobRunner
from .host import Host
from .tasks import CaptionRequest, PreviewOptions, caption_job, train_job

PREFIX = "/lora-train/v1"


class _Strict(BaseModel):
    """Refuses unknown keys, so a typo in a request is a 422 naming it, not a silently ignored setting."""

    class Config:
        extra = "forbid"


class CaptionBody(_Strict):
    input: str = Field(..., description="folder of images")
    model: str = Field(DEFAULT_MODEL, description="BLIP/GIT or WD14 tagger hub id, or a local folder")
    batch_size: int = Field(8, ge=1, le=256)
    prefix: str = ""
    suffix: str = ""
    mode: Literal["skip", "overwrite", "append"] = "skip"
    output: Optional[str] = Field(None, description="metadata.csv to write; default: .txt sidecars")
    recursive: bool = False
    max_length: int = Field(CaptionOptions.max_length, ge=1, le=512)
    min_length: int = Field(CaptionOptions.min_length, ge=0, le=512)
    num_beams: int = Field(CaptionOptions.num_beams, ge=1, le=16)
    general_threshold: float = Field(TaggerOptions.general_threshold, ge=0, le=1, description="tagger only")
    character_threshold: float = Field(TaggerOptions.character_threshold, ge=0, le=1, description="tagger only")
    exclude_tags: List[str] = Field([], description="tagger only: tags never written")
    underscores_to_spaces: bool = True
    rating_tags: bool = False


class PreviewBody(_Strict):
    every_n_steps: int = Field(0, ge=0)
    prompt: str = ""
    seed: int = 1234
    steps: int = Field(20, ge=1, le=150)
    width: Optional[int] = Field(None, ge=64, le=2048, description="default: the training resolution")
    height: Optional[int] = Field(None, ge=64, le=2048)


class TrainBody(_Strict):
    config: Dict[str, Dict[str, Any]] = Field(..., description="the YAML sections data/model/training/output")
    preview: Optional[PreviewBody] = None


class StopBody(_Strict):
    mode: Literal["save", "discard"] = "save"


def _auth_dependencies(api_auth: Optional[str]) -> List[Any]:
    """The WebUI's --api-auth "user:password,user2:password2" as a basic-auth dependency, or none."""
    if not api_auth:
        return []
    credentials = dict(pair.split(":", 1) for pair in api_auth.split(","))

    def check(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> None:
        expected = credentials.get(given.username)
        if expected is None or not compare_digest(given.password, expected):
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})
    return [Depends(check)]


def _unprocessable(error: ValueError) -> HTTPException:
    return HTTPException(422, str(error))


def register(app: FastAPI, runner: JobRunner, host: Host, api_auth: Optional[str] = None) -> None:
    """Adds the routes to the WebUI's FastAPI app."""
    dependencies = _auth_dependencies(api_auth)

    def start(kind: str, make_work: Callable) -> Dict[str, str]:
        try:
            runner.check_free()  # busy first: a running job's own output name is locked, but busy is the answer
            work = make_work()
            return {"job_id": runner.start(kind, work).id}
        except JobBusyError as error:
            raise HTTPException(409, str(error)) from None
        except ValueError as error:  # ConfigError, CaptionError, HostError: the message names the field
            raise _unprocessable(error) from None

    def caption(body: CaptionBody) -> Dict[str, str]:
        request = CaptionRequest(**body.dict())
        return start("caption", lambda: caption_job(request, host))

    def train(body: TrainBody) -> Dict[str, str]:
        preview = PreviewOptions(**body.preview.dict()) if body.preview else None
        return start("train", lambda: train_job(body.config, host, preview))

    def job_status(job_id: str) -> Dict[str, Any]:
        try:
            return runner.get(job_id).snapshot()
        except JobNotFoundError:
            raise HTTPException(404, f"no job {job_id}") from None

    def stop(job_id: str, body: Optional[StopBody] = None) -> Dict[str, Any]:
        try:
            job = runner.get(job_id)
            job.request_stop((body or StopBody()).mode)
        except JobNotFoundError:
            raise HTTPException(404, f"no job {job_id}") from None
        except JobBusyError as error:
            raise HTTPException(409, str(error)) from None
        return job.snapshot()

    app.add_api_route(f"{PREFIX}/caption", caption, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/train", train, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}", job_status, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}/stop", stop, methods=["POST"], dependencies=dependencies)
