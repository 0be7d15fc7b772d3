package quota

// GrantedWaits counts the requests that waited for a refill and were then granted
// quota, by how long they waited, over the buckets of WaitBuckets as Waits does; the
// others learnt that the fleet had none left, or could not be reached in time.
func (m *Manager) GrantedWaits() []uint64 {
	out := make([]uint64, len(m.st.grantedWaits))
	for i := range out {
		out[i] = m.st.grantedWaits[i].Load()
	}
	return out
}
