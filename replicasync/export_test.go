package replicasync

// StopBeatingForTest stops the loops without marking the row stopped: to
// peers, the replica falls silent like a hung or partitioned process.
func (m *Manager) StopBeatingForTest() {
	m.closeOnce.Do(m.stop)
}

// ProbesInFlightForTest counts the peers with a probe under way (including
// back-to-back ones still owed), so a test on the mock clock can wait for
// the probing to settle before moving time.
func (m *Manager) ProbesInFlightForTest() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, st := range m.probes {
		if st.inFlight {
			n++
		}
	}
	return n
}
