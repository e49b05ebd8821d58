package replicasync

// StopBeatingForTest stops the loops without marking the row stopped: to
// peers, the replica falls silent like a hung or partitioned process.
func (m *Manager) StopBeatingForTest() {
	m.closeOnce.Do(m.stop)
}
