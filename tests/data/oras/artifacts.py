"""Pushes a Helm chart and a generic OCI artifact to REGISTRY with the ORAS Python client
(oras-py, from PyPI), pulls both back into fresh directories and prints, as one JSON
object, what came back. Usage: artifacts.py REGISTRY WORKDIR"""

import hashlib
import io
import json
import os
import sys
import tarfile

import oras.client

HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_CHART = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
THING_CONFIG = "application/vnd.example.thing.config.v1+json"
THING_LAYER = "application/vnd.example.thing.layer.v1+text"


def chart_tgz(path):
    """A minimal chart archive, as `helm package` lays it out."""
    chart_yaml = b"apiVersion: v2\nname: hello\nversion: 0.1.0\nappVersion: 1.16.0\n"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("hello/Chart.yaml")
        info.size = len(chart_yaml)
        tar.addfile(info, io.BytesIO(chart_yaml))


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    registry, work = sys.argv[1], sys.argv[2]
    os.chdir(work)
    client = oras.client.OrasClient(hostname=registry, insecure=True)
    # Helm's own config: what `helm push` writes.
    with open("chart-config.json", "w") as f:
        json.dump({"name": "hello", "version": "0.1.0", "apiVersion": "v2",
                   "appVersion": "1.16.0", "description": "A test chart"}, f)
    chart_tgz("hello-0.1.0.tgz")
    client.push(
        target=f"{registry}/charts/hello:0.1.0",
        files=[f"hello-0.1.0.tgz:{HELM_CHART}"],
        manifest_config=f"chart-config.json:{HELM_CONFIG}",
        quiet=True,
    )
    with open("notes.txt", "w") as f:
        f.write("a generic artifact's only layer\n")
    with open("thing-config.json", "w") as f:
        json.dump({"kind": "thing"}, f)
    client.push(
        target=f"{registry}/things/notes:v1",
        files=[f"notes.txt:{THING_LAYER}"],
        manifest_config=f"thing-config.json:{THING_CONFIG}",
        manifest_annotations={"org.example.purpose": "test"},
        quiet=True,
    )
    out = {}
    for name, target, original in [
        ("chart", f"{registry}/charts/hello:0.1.0", "hello-0.1.0.tgz"),
        ("thing", f"{registry}/things/notes:v1", "notes.txt"),
    ]:
        outdir = os.path.join(work, "pulled-" + name)
        os.makedirs(outdir)
        files = client.pull(target=target, outdir=outdir)
        pulled = [f for f in files if os.path.basename(f) == original]
        out[name] = {
            "files": [os.path.basename(f) for f in files],
            "same": bool(pulled) and sha(pulled[0]) == sha(original),
        }
        manifest = client.get_manifest(target)
        out[name]["configMediaType"] = manifest["config"]["mediaType"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
