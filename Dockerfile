# pyenvoy: an Envoy-compatible proxy in Python.
#   docker build -t pyenvoy .
#   docker run --rm -p 10000:10000 -p 9901:9901 pyenvoy
#   docker run --rm -v $PWD/my.yaml:/etc/pyenvoy/envoy.yaml pyenvoy   # your own config
#   docker run --rm pyenvoy -c /etc/pyenvoy/envoy.yaml --concurrency 2  # other flags
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Dependencies (uvloop, protobuf, xds-protos, ...) ship as wheels: no compiler needed.
COPY pyproject.toml README.md /src/
COPY pyenvoy /src/pyenvoy
RUN pip install /src \
 && rm -rf /src \
 && useradd --system --no-create-home --shell /usr/sbin/nologin pyenvoy

# The demo config binds 127.0.0.1, which is unreachable from outside a container:
# bind its listeners and admin to 0.0.0.0 here, then check the result loads.
COPY configs/demo.yaml /etc/pyenvoy/envoy.yaml
RUN python -c 'import yaml; p = "/etc/pyenvoy/envoy.yaml"; c = yaml.safe_load(open(p)); \
s = [l["address"]["socket_address"] for l in c.get("static_resources", {}).get("listeners", [])]; \
s += [c["admin"]["address"]["socket_address"]] if "admin" in c else []; \
[a.update(address="0.0.0.0") for a in s if a.get("address") == "127.0.0.1"]; \
open(p, "w").write(yaml.safe_dump(c, sort_keys=False))' \
 && pyenvoy --mode validate -c /etc/pyenvoy/envoy.yaml

USER pyenvoy
WORKDIR /tmp
EXPOSE 10000 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["pyenvoy"]
CMD ["-c", "/etc/pyenvoy/envoy.yaml"]
