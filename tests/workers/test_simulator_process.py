"""The simulator as its own process, serving every protocol over real HTTP."""

import asyncio
import base64
import os
import sys
from pathlib import Path

import httpx
from sim_calls import GENERATIONS, SCHNELL

from workers.simulator.png import png_size

ROOT = Path(__file__).resolve().parents[2]


async def test_simulator_runs_as_a_process_and_serves_the_protocol_over_http() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_SIM_")}
    env["TOLLGATE_SIM_LATENCY"] = "0.2"  # from the environment, since no flag overrides it
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "workers.simulator",
        "--host",
        "127.0.0.1",
        "--port",
        "0",  # the OS picks a free port; the announcement line tells which
        "--api-key",
        "proc-key",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=15)).decode().strip()
        prefix = "simulator listening on "
        assert line.startswith(prefix + "http://127.0.0.1:"), line
        base_url = line.removeprefix(prefix)
        headers = {"Authorization": "Bearer proc-key"}
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
            assert (await http.get("/_sim/config")).json()["latency"] == 0.2
            response = await http.post(
                "/generate/image/krea/krea-2/large",
                json={"prompt": "over the wire", "aspect_ratio": "3:2"},
                headers=headers,
            )
            assert response.status_code == 200, response.text
            job_id = response.json()["job_id"]
            for _ in range(50):
                job = (await http.get(f"/jobs/{job_id}", headers=headers)).json()
                if job["status"] == "completed":
                    break
                await asyncio.sleep(0.05)
            assert job["status"] == "completed"
            [url] = job["result"]["urls"]
            assert url.startswith(base_url + "/images/")
            image = await http.get(url)
            assert png_size(image.content) == (1280, 832)

            response = await http.post(
                GENERATIONS,
                json={"model": SCHNELL, "prompt": "over the wire", "image_size": "640x384"},
                headers=headers,
            )
            assert response.status_code == 200, response.text
            [generated] = response.json()["images"]
            assert generated["url"].startswith(base_url + "/images/")
            assert png_size((await http.get(generated["url"])).content) == (640, 384)

            # The prefixed protocols, over the wire: a channel's base URL carries the prefix.
            response = await http.post(
                "/openai/v1/images/generations",
                json={"model": "gpt-image-1", "prompt": "over the wire", "size": "1536x1024"},
                headers=headers,
            )
            assert response.status_code == 200, response.text
            [item] = response.json()["data"]
            assert png_size(base64.b64decode(item["b64_json"])) == (1536, 1024)
            response = await http.post(
                "/bfl/v1/flux-pro-1.1-ultra",
                json={"prompt": "over the wire", "aspect_ratio": "16:9"},
                headers={"x-key": "proc-key"},
            )
            assert response.status_code == 200, response.text
            polling_url = response.json()["polling_url"]
            assert polling_url.startswith(base_url + "/bfl/v1/get_result?id=")
            response = await http.post(
                "/unified/v1/images/generations",
                json={"model": "any", "prompt": "over the wire", "size": "512x512"},
                headers=headers,
            )
            assert response.status_code == 200, response.text
            task_path = f"/unified/v1/tasks/{response.json()['id']}"
            for _ in range(50):
                result = (await http.get(polling_url, headers={"x-key": "proc-key"})).json()
                task = (await http.get(task_path, headers=headers)).json()
                if result["status"] == "Ready" and task["status"] == "completed":
                    break
                await asyncio.sleep(0.05)
            sample = (await http.get(result["result"]["sample"])).content
            assert png_size(sample) == (2048, 1152)
            [url] = task["results"]
            assert png_size((await http.get(url)).content) == (512, 512)
    finally:
        if process.returncode is None:
            process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=10) in (0, -15)
