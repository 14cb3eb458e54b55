-- Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d).
-- The tracking data lives in POSTGRES_DB (mlflow); MLflow's basic-auth users and permissions get
-- their own database, so the two sets of migrations never share a schema.
CREATE DATABASE mlflow_auth;
