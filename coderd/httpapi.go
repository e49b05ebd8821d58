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

func writeError(w http.ResponseWriter, status int, message, detail string) {
	writeJSON(w, status, Response{Message: message, Detail: detail})
}
