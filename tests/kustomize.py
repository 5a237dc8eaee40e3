"""``kustomize build`` in Python, for the part of kustomize that ``deploy/kubernetes`` uses.

The tests render the manifests without a ``kustomize`` or ``kubectl`` binary: a
kustomization is read the way kustomize reads it (resources, which may be
other kustomizations; ``namespace``; ``images``; ConfigMap and Secret
generators with ``behavior`` and ``disableNameSuffixHash``; inline JSON 6902
``patches``) and any other field is refused, so a manifest never relies on
something this module silently ignores. Generated names get a suffix that
follows their content, and every reference to them in a pod spec is renamed,
so the output is what ``kubectl kustomize`` prints but for the suffixes'
digits (``test_kubernetes.py`` compares the two where kubectl is installed).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

FIELDS = frozenset({"apiVersion", "kind", "resources", "namespace", "images", "configMapGenerator",
                    "secretGenerator", "patches"})
"""The kustomization fields understood here; any other is an error."""

GENERATOR_FIELDS = frozenset({"name", "behavior", "literals", "files", "options"})
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                            "StorageClass", "PriorityClass", "PersistentVolume"})


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not do, or does it wrong."""


@dataclass
class _Generated:
    resource: Resource
    hashed: bool


@dataclass
class _Build:
    resources: list[Resource] = field(default_factory=list)
    generated: dict[tuple[str, str], _Generated] = field(default_factory=dict)
    """Generated ConfigMaps and Secrets by (kind, name before the hash), in ``resources`` too."""


def build(directory: Path) -> list[Resource]:
    """The resources ``kustomize build DIRECTORY`` prints, as dicts (in no particular order)."""
    result = _build(Path(directory))
    renames: dict[tuple[str, str], str] = {}
    for (kind, name), generated in result.generated.items():
        if generated.hashed:
            generated.resource["metadata"]["name"] = f"{name}-{content_hash(generated.resource)}"
        renames[(kind, name)] = generated.resource["metadata"]["name"]
    for resource in result.resources:
        for pod in pod_specs(resource):
            _rename_references(pod, renames)
    return result.resources


def _build(directory: Path) -> _Build:
    file = directory / "kustomization.yaml"
    if not file.is_file():
        raise KustomizeError(f"{directory} has no kustomization.yaml")
    kustomization = yaml.safe_load(file.read_text()) or {}
    unknown = set(kustomization) - FIELDS
    if unknown:
        raise KustomizeError(f"{file}: fields this renderer does not do: {sorted(unknown)}")
    result = _Build()
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            inner = _build(path)
            result.resources.extend(inner.resources)
            result.generated.update(inner.generated)
        else:
            result.resources.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for generator in kustomization.get(key, []):
            _generate(directory, kind, generator, result)
    for patch in kustomization.get("patches", []):
        _patch(result.resources, patch, file)
    for image in kustomization.get("images", []):
        _set_image(result.resources, image)
    namespace = kustomization.get("namespace")
    if namespace:
        for resource in result.resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = namespace
    _check_unique(result.resources, file)
    return result


def _generate(directory: Path, kind: str, generator: dict[str, Any], result: _Build) -> None:
    unknown = set(generator) - GENERATOR_FIELDS
    if unknown:
        raise KustomizeError(f"{kind} generator {generator.get('name')}: fields this renderer does not do: "
                             f"{sorted(unknown)}")
    name = generator["name"]
    options = generator.get("options") or {}
    if set(options) - {"disableNameSuffixHash"}:
        raise KustomizeError(f"{kind} generator {name}: options this renderer does not do: {sorted(options)}")
    data: dict[str, str] = {}
    for literal in generator.get("literals", []):
        key, sep, value = literal.partition("=")
        if not sep:
            raise KustomizeError(f"{kind} generator {name}: literal {literal!r} is not KEY=VALUE")
        data[key] = value
    for entry in generator.get("files", []):
        key, sep, path = entry.partition("=")
        path = path if sep else key
        key = key if sep else Path(path).name
        data[key] = (directory / path).read_text()
    behavior = generator.get("behavior", "create")
    existing = result.generated.get((kind, name))
    if behavior == "create":
        if existing is not None:
            raise KustomizeError(f"{kind} {name} is generated twice (behavior: create)")
        resource: Resource = {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}}
        if kind == "Secret":
            resource["type"] = "Opaque"
        result.resources.append(resource)
    elif behavior in ("merge", "replace"):
        if existing is None:
            raise KustomizeError(f"{kind} {name}: behavior {behavior} needs one generated in a base")
        resource = existing.resource
        if behavior == "merge":
            data = {**_plain_data(resource), **data}
    else:
        raise KustomizeError(f"{kind} {name}: unknown behavior {behavior!r}")
    if kind == "Secret":
        resource["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        resource["data"] = data
    if "disableNameSuffixHash" in options:
        hashed = not options["disableNameSuffixHash"]
    else:
        hashed = existing.hashed if existing is not None else True
    result.generated[(kind, name)] = _Generated(resource, hashed)


def _plain_data(resource: Resource) -> dict[str, str]:
    data = resource.get("data") or {}
    if resource["kind"] == "Secret":
        return {k: base64.b64decode(v).decode() for k, v in data.items()}
    return dict(data)


def content_hash(resource: Resource) -> str:
    """A name suffix that changes with the content, in kustomize's alphabet (10 characters; 0, 1, 3, a and e
    swapped for letters). The digits are not kustomize's own, so the output matches ``kubectl kustomize``
    up to these suffixes."""
    content = {"kind": resource["kind"], "name": resource["metadata"]["name"], "type": resource.get("type"),
               "data": resource.get("data") or {}}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _patch(resources: list[Resource], patch: dict[str, Any], file: Path) -> None:
    if set(patch) != {"target", "patch"} or set(patch["target"]) - {"kind", "name"}:
        raise KustomizeError(f"{file}: only inline JSON 6902 patches with a target kind and name are done here")
    operations = yaml.safe_load(patch["patch"])
    if not isinstance(operations, list):
        raise KustomizeError(f"{file}: a strategic-merge patch is not done here, only JSON 6902 (a list)")
    target = patch["target"]
    matched = [r for r in resources if r["kind"] == target["kind"]
               and ("name" not in target or r["metadata"]["name"] == target["name"])]
    if not matched:
        raise KustomizeError(f"{file}: the patch target {target} matches no resource")
    for resource in matched:
        for operation in operations:
            _apply(resource, operation, file)


def _apply(document: Resource, operation: dict[str, Any], file: Path) -> None:
    """One JSON Patch (RFC 6902) operation: add, replace or remove."""
    op, path = operation["op"], operation["path"]
    keys = [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]
    parent: Any = document
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last = keys[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(index, copy.deepcopy(operation["value"]))
        elif op == "replace":
            parent[index] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del parent[index]
        else:
            raise KustomizeError(f"{file}: JSON patch op {op!r} is not done here")
        return
    if op in ("replace", "remove") and last not in parent:
        raise KustomizeError(f"{file}: {op} {path}: there is nothing at that path")
    if op in ("add", "replace"):
        parent[last] = copy.deepcopy(operation["value"])
    elif op == "remove":
        del parent[last]
    else:
        raise KustomizeError(f"{file}: JSON patch op {op!r} is not done here")


def _set_image(resources: list[Resource], image: dict[str, Any]) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise KustomizeError(f"images: only name, newName and newTag are done here, got {sorted(image)}")
    for resource in resources:
        for pod in pod_specs(resource):
            for container in containers(pod):
                name, tag = split_image(container["image"])
                if name == image["name"]:
                    name = image.get("newName", name)
                    tag = str(image["newTag"]) if "newTag" in image else tag
                    container["image"] = f"{name}:{tag}" if tag else name


def split_image(reference: str) -> tuple[str, str | None]:
    """``registry/name:tag`` as (``registry/name``, ``tag``); a port in the registry is not a tag."""
    name, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:
        return reference, None
    return name, tag


def pod_specs(resource: Resource) -> Iterator[dict[str, Any]]:
    """The pod specs of a workload: a Deployment's (and the like) template, a CronJob's job template."""
    spec = resource.get("spec") or {}
    if resource["kind"] == "Pod":
        yield spec
    elif resource["kind"] == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]
    elif "template" in spec and "spec" in spec["template"]:
        yield spec["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """Init containers and containers of a pod spec."""
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _rename_references(pod: dict[str, Any], renames: dict[tuple[str, str], str]) -> None:
    def rename(ref: dict[str, Any] | None, kind: str, key: str = "name") -> None:
        if ref is not None and (kind, ref.get(key)) in renames:
            ref[key] = renames[(kind, ref[key])]

    for volume in pod.get("volumes", []):
        rename(volume.get("configMap"), "ConfigMap")
        rename(volume.get("secret"), "Secret", "secretName")
        for source in (volume.get("projected") or {}).get("sources", []):
            rename(source.get("configMap"), "ConfigMap")
            rename(source.get("secret"), "Secret")
    for container in containers(pod):
        for source in container.get("envFrom", []):
            rename(source.get("configMapRef"), "ConfigMap")
            rename(source.get("secretRef"), "Secret")
        for variable in container.get("env", []):
            value_from = variable.get("valueFrom") or {}
            rename(value_from.get("configMapKeyRef"), "ConfigMap")
            rename(value_from.get("secretKeyRef"), "Secret")
    for pull in pod.get("imagePullSecrets", []):
        rename(pull, "Secret")


def _check_unique(resources: list[Resource], file: Path) -> None:
    seen: set[tuple[str, str]] = set()
    for resource in resources:
        key = (resource["kind"], resource["metadata"]["name"])
        if key in seen:
            raise KustomizeError(f"{file}: {key[0]} {key[1]} appears twice")
        seen.add(key)
