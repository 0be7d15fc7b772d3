// Package deploy holds no code: it is the home of gatehouse's deployment examples
// (kubernetes/, nginx/, envoy/, traefik/) and of the tests that keep them true: the
// Kubernetes manifest decodes and its configuration loads and agrees with its probes,
// ports and mounts, and nginx runs for real with the documented auth_request
// configuration in front of gatehouse's check endpoint. See README.md.
package deploy
