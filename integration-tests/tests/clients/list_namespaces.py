"""Lists a member cluster's namespaces through the proxy with the official Kubernetes Python client.

Usage: list_namespaces.py KUBECONFIG (url|headers) [CLIENT TOKEN]

The client reads the kubeconfig's proxy-url, but its HTTP layer (urllib3) ignores credentials in
that URL: with `url`, only the kubeconfig is used, as most programs would. With `headers`, the
credentials go where urllib3 sends them, as the README shows.
"""

import sys

import urllib3
from kubernetes import client, config

kubeconfig, mode = sys.argv[1], sys.argv[2]
configuration = client.Configuration()
config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
if mode == "headers":
    name, token = sys.argv[3], sys.argv[4]
    configuration.proxy_headers = urllib3.util.make_headers(proxy_basic_auth=f"{name}:{token}")
api = client.CoreV1Api(client.ApiClient(configuration))
try:
    items = api.list_namespace(_request_timeout=10).items
except Exception as e:  # the test reads what went wrong
    print(f"error: {e}")
    sys.exit(1)
print("namespaces:", " ".join(n.metadata.name for n in items))
