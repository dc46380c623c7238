#!/usr/bin/env bash
# Apply one variant of the Z-Image-Turbo RayService with one command:
#
#   k8s/apply.sh nvidia|amd|mixed            # apply (model-cache PVC + download Job, wait for it, RayService)
#   k8s/apply.sh mixed --render              # print the manifests instead of applying them
#   kubectl apply -k k8s/monitoring          # PodMonitor + Grafana dashboard (Prometheus Operator, Grafana sidecar)
#
# Environment:
#   SERVE_APP_IMAGE_CUDA=registry/serve-app-cuda:tag   image for NVIDIA pods (and the head of nvidia/mixed)
#   SERVE_APP_IMAGE_ROCM=registry/serve-app-rocm:tag   image for AMD pods (and the head of amd)
#   NAMESPACE=...                                      target namespace (default: kubectl's current one)
#   SKIP_MODEL_WAIT=1                                  do not wait for the weights download Job
#   MODEL_DOWNLOAD_TIMEOUT=3600s                       how long to wait for it
# Needs kubectl >= 1.27 (built-in kustomize) and the KubeRay operator (>= 1.5; manifests use ray.io/v1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
variant=${1:-}
if [ -z "$variant" ] || [ ! -f "$here/$variant/kustomization.yaml" ] || [ "$variant" = base ]; then
  echo "usage: $0 {$(cd "$here" && ls -d */ | tr -d / | grep -vx 'base\|configs\|images' | paste -sd '|')} [--render]" >&2
  exit 2
fi
shift
render=0
[ "${1:-}" = "--render" ] && render=1

ns=()
[ -n "${NAMESPACE:-}" ] && ns=(-n "$NAMESPACE")

# An overlay next to the variant retargets the images without editing committed files.
target="$here/$variant"
if [ -n "${SERVE_APP_IMAGE_CUDA:-}${SERVE_APP_IMAGE_ROCM:-}" ]; then
  tmp=$(mktemp -d "$here/.apply-$variant-XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  {
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources: [../$variant]"
    echo "images:"
    for pair in "serve-app-cuda=${SERVE_APP_IMAGE_CUDA:-}" "serve-app-rocm=${SERVE_APP_IMAGE_ROCM:-}"; do
      name=${pair%%=*}; ref=${pair#*=}
      [ -n "$ref" ] || continue
      echo "- name: $name"
      if [[ "$ref" == *@* ]]; then
        echo "  newName: ${ref%@*}"; echo "  digest: ${ref#*@}"
      elif [[ "${ref##*/}" == *:* ]]; then
        echo "  newName: ${ref%:*}"; echo "  newTag: \"${ref##*:}\""
      else
        echo "  newName: $ref"
      fi
    done
  } > "$tmp/kustomization.yaml"
  target=$tmp
fi

if [ "$render" = 1 ]; then
  kubectl kustomize "$target"
  exit 0
fi

# 1. the weights: PVC + one-shot download Job (idempotent), then wait so replicas find them
kubectl apply "${ns[@]}" -k "$here/base"
if [ "${SKIP_MODEL_WAIT:-0}" != 1 ]; then
  echo "waiting for job/z-image-model-download (Tongyi-MAI/Z-Image-Turbo into the model-cache PVC)..."
  kubectl wait "${ns[@]}" --for=condition=complete job/z-image-model-download --timeout="${MODEL_DOWNLOAD_TIMEOUT:-3600s}"
fi
# 2. the RayService (re-applies the base unchanged)
# 2. the API keys the ingress requires (server.require_api_keys): a random one unless the Secret exists;
#    read it with: kubectl get secret z-image-api-keys -o jsonpath='{.data.keys}' | base64 -d
if ! kubectl get "${ns[@]}" secret z-image-api-keys >/dev/null 2>&1; then
  kubectl create "${ns[@]}" secret generic z-image-api-keys --from-literal=keys="sk-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
fi
kubectl apply "${ns[@]}" -k "$target"
echo "applied $variant: kubectl get rayservice z-image; the app answers on service z-image-serve-svc:8000 once /health is 200"
