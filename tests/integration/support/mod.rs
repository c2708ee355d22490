//! Shared test support: privilege checks, throwaway network namespaces, traffic helpers.
