"""Data contracts of tokenfactory: pydantic models and Arrow schemas. No torch, no Ray."""

from schemas.arrow import (
    ARROW_SCHEMAS,
    CATALOG_ROW_SCHEMA,
    TOKEN_RECORD_SCHEMA,
    arrow_schema,
    from_arrow,
    to_arrow,
)
from schemas.catalog import (
    CONCEPT_SLOT,
    CatalogManifest,
    CatalogRow,
    ConceptSpec,
    RetrievalQuery,
    Split,
    concepts_from_rows,
    rows_from_concepts,
)
from schemas.gair import DEFAULT_INTENT_MARGIN, MAX_REFINE
from schemas.ids import (
    CONCEPT_ID_PATTERN,
    CONCEPT_ID_RULE,
    ConceptId,
    ParentWord,
    RunId,
    UtcDatetime,
    utc_now,
    validate_concept_id,
    validate_parent,
)
from schemas.reports import RejectedImage, RunReport, SkippedConcept
from schemas.tokens import (
    REGISTRY_FORMAT,
    Parametrization,
    RegistryFile,
    RegistryManifest,
    TokenRecord,
)

__all__ = [
    "ARROW_SCHEMAS",
    "CATALOG_ROW_SCHEMA",
    "CONCEPT_ID_PATTERN",
    "CONCEPT_ID_RULE",
    "CONCEPT_SLOT",
    "DEFAULT_INTENT_MARGIN",
    "MAX_REFINE",
    "REGISTRY_FORMAT",
    "TOKEN_RECORD_SCHEMA",
    "CatalogManifest",
    "CatalogRow",
    "ConceptId",
    "ConceptSpec",
    "Parametrization",
    "ParentWord",
    "RegistryFile",
    "RegistryManifest",
    "RejectedImage",
    "RetrievalQuery",
    "RunId",
    "RunReport",
    "SkippedConcept",
    "Split",
    "TokenRecord",
    "UtcDatetime",
    "arrow_schema",
    "concepts_from_rows",
    "from_arrow",
    "rows_from_concepts",
    "to_arrow",
    "utc_now",
    "validate_concept_id",
    "validate_parent",
]
