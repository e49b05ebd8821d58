package coderd

import (
	"encoding/json"
	"net/http"
)

// Response is the body of every error answer: a one-line message for
// people and, where useful, a detail for debugging.
type Response struct {
	Message string `json:"message"`
	Detail  string `json:"detail,omitempty"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// writeError answers with a JSON Response. The detail is shown to whoever
// asked: never put a database or driver error in it on a path a caller
// without a valid token can reach (log it instead).
func writeError(w http.ResponseWriter, status int, message, detail string) {
	writeJSON(w, status, Response{Message: message, Detail: detail})
}
