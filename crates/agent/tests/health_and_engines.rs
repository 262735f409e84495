//! In-process agent checks: grpc.health.v1 reports SERVING for the control
//! service, and the blocking I/O engine (the io_uring fallback) serves data.

use std::time::Duration;

use ember_agent::{Config, Listeners, run};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving_and_blocking_engine_is_selected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api_port = free_port();
    let config = Config {
        data_dir: dir.path().to_owned(),
        api: Some(format!("http://127.0.0.1:{api_port}")),
        nbd: "127.0.0.1:0".into(),
        io_engine: "blocking".into(),
        ..Config::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(run(config, Listeners::default(), async move {
        let _ = stop_rx.await;
    }));
    let endpoint = format!("http://127.0.0.1:{api_port}");
    let mut health = None;
    for _ in 0..100 {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone()).expect("endpoint");
        if let Ok(c) = channel.connect().await {
            health = Some(HealthClient::new(c));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut health = health.expect("agent API came up");
    let status = health
        .check(HealthCheckRequest {
            service: "ember.control.v1.EmberControl".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await;
    assert_eq!(
        unknown.expect_err("unknown service").code(),
        tonic::Code::NotFound
    );

    let mut control =
        ember_proto::control::v1::ember_control_client::EmberControlClient::connect(endpoint)
            .await
            .expect("control client");
    let caps = control
        .get_capabilities(ember_proto::control::v1::GetCapabilitiesRequest {})
        .await
        .expect("capabilities")
        .into_inner();
    assert_eq!(caps.io_engine, "blocking");
    let bad = control
        .create_volume(ember_proto::control::v1::CreateVolumeRequest {
            name: "v".into(),
            size_bytes: 0,
            ..Default::default()
        })
        .await;
    assert_eq!(
        bad.expect_err("zero size").code(),
        tonic::Code::InvalidArgument
    );

    stop_tx.send(()).expect("stop");
    agent.await.expect("agent task").expect("agent ran cleanly");
}
