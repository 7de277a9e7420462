"""imgest's archive in XNAT's data model, for XNAT's clients: the schema they build their object
model from (`GET /xapi/schemas/xnat`), and the single-object JSON (`items`) they read an object
by (`GET /data/projects/P?format=json`, and so on down to a scan).

The schema is imgest's own and small: only what imgest keeps (projects, subjects, image sessions
by modality, scans, resources), with XNAT's namespace and type names, because the clients key
their behaviour on those names (xnatpy adds its methods to the class named ProjectData, lists a
session's scans under `scans/scan`, and so on). Files are xnatpy's own type.
"""

from typing import Any

from .models import Project

SESSION_TYPES = {"CT": "ct", "MR": "mr", "PT": "pet", "US": "us", "CR": "cr", "DX": "dx",
                 "MG": "mg", "NM": "nm", "XA": "xa", "RF": "rf", "SM": "sm", "XC": "xc"}
OTHER = "otherDicom"  # a DICOM modality XNAT has no type for

_HEAD = """<?xml version="1.0" encoding="UTF-8"?>
<!-- imgest: the part of XNAT's data model that imgest's archive holds. -->
<xs:schema targetNamespace="http://nrg.wustl.edu/xnat" xmlns:xnat="http://nrg.wustl.edu/xnat" \
xmlns:xdat="http://nrg.wustl.edu/xdat" xmlns:xs="http://www.w3.org/2001/XMLSchema" \
elementFormDefault="qualified" attributeFormDefault="unqualified">
  <xs:element name="Project" type="xnat:projectData"/>
  <xs:element name="Subject" type="xnat:subjectData"/>
  <xs:element name="ImageSession" type="xnat:imageSessionData"/>
  <xs:element name="ResourceCatalog" type="xnat:resourceCatalog"/>
  <xs:complexType name="projectData">
    <xs:annotation><xs:documentation>A project: who may see and send what, and where sessions
      go.</xs:documentation></xs:annotation>
    <xs:sequence>
      <xs:element name="name" type="xs:string" minOccurs="0"/>
      <xs:element name="description" type="xs:string" minOccurs="0"/>
    </xs:sequence>
    <xs:attribute name="ID" type="xs:string" use="required"/>
    <xs:attribute name="secondary_ID" type="xs:string"/>
  </xs:complexType>
  <xs:complexType name="subjectData">
    <xs:annotation><xs:appinfo><xdat:element displayIdentifiers="label"/></xs:appinfo>
      <xs:documentation>A subject (patient, animal, specimen) of a project.</xs:documentation>
    </xs:annotation>
    <xs:sequence>
      <xs:element name="experiments" minOccurs="0">
        <xs:complexType><xs:sequence>
          <xs:element name="experiment" type="xnat:subjectAssessorData" minOccurs="0"
            maxOccurs="unbounded"/>
        </xs:sequence></xs:complexType>
      </xs:element>
    </xs:sequence>
    <xs:attribute name="ID" type="xs:string" use="required"/>
    <xs:attribute name="project" type="xs:string"/>
    <xs:attribute name="label" type="xs:string"/>
  </xs:complexType>
  <xs:complexType name="experimentData">
    <xs:annotation><xs:appinfo><xdat:element displayIdentifiers="label"/></xs:appinfo>
    </xs:annotation>
    <xs:sequence>
      <xs:element name="date" type="xs:date" minOccurs="0"/>
      <xs:element name="time" type="xs:time" minOccurs="0"/>
      <xs:element name="note" type="xs:string" minOccurs="0"/>
    </xs:sequence>
    <xs:attribute name="ID" type="xs:string" use="required"/>
    <xs:attribute name="project" type="xs:string" use="required"/>
    <xs:attribute name="label" type="xs:string"/>
  </xs:complexType>
  <xs:complexType name="subjectAssessorData">
    <xs:complexContent><xs:extension base="xnat:experimentData"><xs:sequence>
      <xs:element name="subject_ID" type="xs:string"/>
    </xs:sequence></xs:extension></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="imageSessionData">
    <xs:annotation><xs:documentation>A session: one study's scans (or one upload's photos or
      slides).</xs:documentation></xs:annotation>
    <xs:complexContent><xs:extension base="xnat:subjectAssessorData"><xs:sequence>
      <xs:element name="modality" type="xs:string" minOccurs="0"/>
      <xs:element name="UID" type="xs:string" minOccurs="0"/>
      <xs:element name="scans" minOccurs="0">
        <xs:complexType><xs:sequence>
          <xs:element name="scan" type="xnat:imageScanData" minOccurs="0"
            maxOccurs="unbounded"/>
        </xs:sequence></xs:complexType>
      </xs:element>
    </xs:sequence></xs:extension></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="imageScanData">
    <xs:annotation><xs:appinfo><xdat:element displayIdentifiers="ID"/></xs:appinfo>
      <xs:documentation>A scan: a DICOM series, a photo or a slide.</xs:documentation>
    </xs:annotation>
    <xs:sequence>
      <xs:element name="series_description" type="xs:string" minOccurs="0"/>
      <xs:element name="modality" type="xs:string" minOccurs="0"/>
    </xs:sequence>
    <xs:attribute name="ID" type="xs:string" use="required"/>
    <xs:attribute name="type" type="xs:string"/>
    <xs:attribute name="UID" type="xs:string"/>
    <xs:attribute name="image_session_ID" type="xs:string"/>
    <xs:attribute name="project" type="xs:string"/>
  </xs:complexType>
  <xs:complexType name="abstractResource">
    <xs:attribute name="label" type="xs:string"/>
    <xs:attribute name="file_count" type="xs:integer"/>
    <xs:attribute name="file_size" type="xs:integer"/>
  </xs:complexType>
  <xs:complexType name="resource">
    <xs:complexContent><xs:extension base="xnat:abstractResource">
      <xs:attribute name="URI" type="xs:string"/>
      <xs:attribute name="format" type="xs:string"/>
      <xs:attribute name="content" type="xs:string"/>
    </xs:extension></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="resourceCatalog">
    <xs:complexContent><xs:extension base="xnat:resource"/></xs:complexContent>
  </xs:complexType>
"""
_KIND = """  <xs:complexType name="{name}{kind}Data">
    <xs:complexContent><xs:extension base="xnat:image{kind}Data"/></xs:complexContent>
  </xs:complexType>
"""
SCHEMAS = {"xnat": _HEAD + "".join(_KIND.format(name=name, kind=kind)
                                   for name in [*SESSION_TYPES.values(), OTHER]
                                   for kind in ("Session", "Scan")) + "</xs:schema>\n"}


def xsi_type(modality: str | None, kind: str) -> str:
    """`kind` is Session or Scan. A photo or slide with no DICOM modality is a plain image."""
    if modality is None:
        return f"xnat:image{kind}Data"
    return f"xnat:{SESSION_TYPES.get(modality, OTHER)}{kind}Data"


def item(xsi: str, fields: dict[str, Any], children: list[dict[str, Any]] | None = None,
         created: str | None = None) -> dict[str, Any]:
    """One object as XNAT describes it. Empty fields are left out, as XNAT does."""
    meta: dict[str, Any] = {"xsi:type": xsi, "isHistory": False}
    if created:
        meta["start_date"] = created
    return {"meta": meta, "children": children or [],
            "data_fields": {k: v for k, v in fields.items() if v not in (None, "")}}


def items(xsi: str, fields: dict[str, Any], children: list[dict[str, Any]] | None = None,
          created: str | None = None) -> dict[str, Any]:
    """One object as XNAT's `?format=json` sends it."""
    return {"items": [item(xsi, fields, children, created)]}


def project_items(project: Project) -> dict[str, Any]:
    return items("xnat:projectData", {"ID": project.id, "secondary_ID": project.id,
                                      "name": project.name, "description": project.description},
                 created=project.created_at.isoformat())


def xnat_id(project: str, label: str) -> str:
    """A subject's or session's ID. XNAT's are unique across the site, and clients keep
    subjects and sessions by them (xnat's does: with IDs that were labels, SUBJ1 of project PA
    was answered by PB's). Labels are unique in their project, and no label or project ID has
    a dot, so the project and a dot before the label make one; paths take it where they take
    the label (`xnat_api.XnatIds`)."""
    return f"{project}.{label}"


def subject_items(project: str, subject: dict[str, Any]) -> dict[str, Any]:
    return items("xnat:subjectData", {"ID": xnat_id(project, subject["label"]),
                                      "label": subject["label"], "project": project},
                 created=subject["created_at"])


def _scan_fields(project: str, session: str, scan: dict[str, Any]) -> dict[str, Any]:
    return {"ID": scan["label"], "type": scan["description"] or "",
            "series_description": scan["description"] or "", "modality": scan["modality"],
            "UID": scan["series_uid"], "image_session_ID": xnat_id(project, session),
            "project": project}


def session_items(s: dict[str, Any]) -> dict[str, Any]:
    """A session with its scans as children (field scans/scan), as XNAT nests them."""
    modality = s["modalities"][0] if s["modalities"] else None
    scans = [item(xsi_type(c["modality"], "Scan"), _scan_fields(s["project"], s["label"], c))
             for c in s["scans"]]
    return items(xsi_type(modality, "Session"), {
        "ID": xnat_id(s["project"], s["label"]), "label": s["label"], "project": s["project"],
        "subject_ID": xnat_id(s["project"], s["subject"]), "modality": modality,
        "UID": s["study_uid"]},
        [{"field": "scans/scan", "items": scans}] if scans else [], created=s["created_at"])


def scan_items(s: dict[str, Any], scan: dict[str, Any]) -> dict[str, Any]:
    return items(xsi_type(scan["modality"], "Scan"), _scan_fields(s["project"], s["label"], scan),
                 created=s["created_at"])
